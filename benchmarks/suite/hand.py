"""Hand-written PyTorch references for the training comparison: VGG16 and ResNet-50 written
the way a PyTorch user would (torch.nn modules, in-place ReLU, nn.BatchNorm2d)."""
from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

VGG16 = [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"]


class HandVGG16(nn.Module):
    def __init__(self, size: int, classes: int = 1000):
        super().__init__()
        layers, c = [], 3
        for v in VGG16:
            if v == "M":
                layers.append(nn.MaxPool2d(2, 2))
            else:
                layers += [nn.Conv2d(c, v, 3, padding=1), nn.ReLU(inplace=True)]
                c = v
        self.features = nn.Sequential(*layers)
        side = size // 32
        self.classifier = nn.Sequential(
            nn.Linear(512 * side * side, 4096), nn.ReLU(inplace=True), nn.Dropout(),
            nn.Linear(4096, 4096), nn.ReLU(inplace=True), nn.Dropout(), nn.Linear(4096, classes))

    def forward(self, x, label):
        logits = self.classifier(torch.flatten(self.features(x), 1))
        return F.cross_entropy(logits, label.long())


class Bottleneck(nn.Module):
    def __init__(self, cin: int, mid: int, stride: int):
        super().__init__()
        out = mid * 4
        self.a = nn.Sequential(nn.Conv2d(cin, mid, 1, stride, bias=False), nn.BatchNorm2d(mid),
                               nn.ReLU(inplace=True))
        self.b = nn.Sequential(nn.Conv2d(mid, mid, 3, 1, 1, bias=False), nn.BatchNorm2d(mid),
                               nn.ReLU(inplace=True))
        self.c = nn.Sequential(nn.Conv2d(mid, out, 1, bias=False), nn.BatchNorm2d(out))
        self.short = (nn.Sequential(nn.Conv2d(cin, out, 1, stride, bias=False),
                                    nn.BatchNorm2d(out)) if stride != 1 or cin != out else None)

    def forward(self, x):
        y = self.c(self.b(self.a(x)))
        return F.relu_(y + (x if self.short is None else self.short(x)))


class HandResNet50(nn.Module):
    def __init__(self, size: int, classes: int = 1000):
        super().__init__()
        layers = [nn.Conv2d(3, 64, 7, 2, 3, bias=False), nn.BatchNorm2d(64), nn.ReLU(inplace=True),
                  nn.MaxPool2d(3, 2, ceil_mode=True)]     # Caffe pools round up
        cin = 64
        for blocks, mid, stride in ((3, 64, 1), (4, 128, 2), (6, 256, 2), (3, 512, 2)):
            for b in range(blocks):
                layers.append(Bottleneck(cin, mid, stride if b == 0 else 1))
                cin = mid * 4
        self.features = nn.Sequential(*layers)
        self.fc = nn.Linear(2048, classes)

    def forward(self, x, label):
        y = F.adaptive_avg_pool2d(self.features(x), 1).flatten(1)
        return F.cross_entropy(self.fc(y), label.long())


HAND = {"vgg16": HandVGG16, "resnet50": HandResNet50}
