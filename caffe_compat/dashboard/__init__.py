"""``caffe dashboard``: a local web app over ``caffe dataset``, ``caffe fit``, model bundles and
the solver's metrics stream (DIGITS' workflow for this engine).

- ``settings``: where things live (workdir, data root, models) and who may ask (token);
- ``safety``: path containment, upload caps, the token check;
- ``store``: SQLite records of datasets and jobs (survive a restart);
- ``workers``: ``caffe dataset`` / ``caffe fit`` child processes and their fate;
- ``netinfo``: prototxt validation, Graphviz drawing, params/FLOPs table;
- ``inference``: top-k classification with a job's bundle;
- ``api`` / ``pages`` / ``app``: the REST API, the HTML pages, the ASGI app;
- ``cli``: the command's flags and the uvicorn server.

Importing this package pulls in no web framework; ``app`` does.
"""
