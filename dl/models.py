"""CNNs by name with their weights, the preprocessing that belongs to those weights, and named
feature layers: one place that extraction, training and scoring all use.

    model = load_model("alexnet", "none")            # random init (tests of mechanics)
    model = load_model("alexnet", "imagenet")        # torchvision's weight enum (TORCH_HOME or a download)
    model = load_model("mobilenet_v2", "s3://b/w/mobilenet_v2.pth", num_classes=10)
                                                      # a staged state_dict with its card (dl.weights),
                                                      # any head: loaded with its own, then replaced
    pre = preprocessing("mobilenet_v2", uri)          # the card's resize, crop and mean/std
    fx = FeatureExtractor(model, ("fc6", "fc7"))     # runs the network only up to fc7
    out = fx(pre(uint8_images))                      # {"fc6": (N, 4096), "fc7": (N, 4096)}

Heads: the output layer is the last Linear of the network, or, for SqueezeNet (no Linear), its
last 1x1 convolution; `num_classes` replaces it. Layers: `fc6` and `fc7` are Caffe's names for
the first two fully connected layers of AlexNet and VGG, taken after their ReLU as the original
did; `prelogit` is the input of the head (ResNet's or MobileNet's pooled features; SqueezeNet's
feature map averaged over its positions).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torchvision
from torch import nn
from torchvision.models.feature_extraction import create_feature_extractor, get_graph_node_names

from dl.weights import IMAGENET_MEAN, IMAGENET_STD, ModelError  # noqa: F401 - the names dl.models has always had

CAFFE_LAYERS = ("fc6", "fc7")


def model_names() -> list[str]:
    return sorted(torchvision.models.list_models(module=torchvision.models))


AUX_HEADS = ("googlenet", "inception_v3")  # auxiliary classifiers: never used here, always left out
AUX_KEYS = ("aux1.", "aux2.", "AuxLogits.")


def load_model(name: str, weights: str = "none", num_classes: int | None = None,
               endpoint: str | None = None, region: str | None = None, seed: int = 0, **kwargs) -> nn.Module:
    """A torchvision model in eval mode. weights: 'none' (random init from `seed`: the same
    weights in every worker and on every rerun), 'imagenet' (the model's default weight enum,
    from TORCH_HOME or downloaded) or the URI of a state_dict with its card (dl.weights; local,
    s3://, gs://; loaded with weights_only=True, checked against the card's sha256). The state
    loads strictly with its own head, whatever its size; num_classes then replaces the head
    (seeded). GoogLeNet and Inception come without their auxiliary classifiers; the card's
    builder arguments and kwargs go to the torchvision builder."""
    from dl import weights as w

    if name not in model_names():
        raise ModelError(f"unknown model {name!r}: use a torchvision classifier ({', '.join(model_names()[:8])}, ...)")
    c = w.card(name, weights, endpoint, region)
    kwargs = {**c.kwargs, **kwargs}
    if weights == "imagenet":
        enum = torchvision.models.get_model_weights(name).DEFAULT
        try:
            model = torchvision.models.get_model(name, weights=enum, **kwargs)
        except (OSError, RuntimeError) as e:  # URLError is an OSError
            raise ModelError(f"imagenet weights for {name} could not be downloaded ({type(e).__name__}: {e}); this "
                             "needs internet access, a TORCH_HOME holding hub/checkpoints/"
                             f"{enum.url.rsplit('/', 1)[-1]}, or a staged weights file (python -m dl.weights stage)")
    else:
        state = w.read_state(weights, c, endpoint, region) if weights != "none" else None
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            if name in AUX_HEADS:
                kwargs = {"aux_logits": False, "init_weights": True, **kwargs}
            model = torchvision.models.get_model(name, weights=None, **kwargs)
        if state is not None:
            if name in AUX_HEADS:
                state = {k: v for k, v in state.items() if not k.startswith(AUX_KEYS)}
            path, _ = head(model)
            if f"{path}.weight" not in state:
                raise ModelError(f"model weights {weights} do not fit {name}: no {path}.weight (its head)")
            replace_head(model, int(state[f"{path}.weight"].shape[0]), seed)  # the checkpoint's own head size
            try:
                model.load_state_dict(state)
            except RuntimeError as e:
                raise ModelError(f"model weights {weights} do not fit {name}: {str(e).splitlines()[0]}") from None
    if num_classes is not None:
        replace_head(model, num_classes, seed)
    return model.eval()


def head(model: nn.Module) -> tuple[str, nn.Module]:
    """(path, module) of the output layer: the last Linear, or the last 1x1 convolution of a
    network without one (SqueezeNet)."""
    mods = list(model.named_modules())
    linears = [(n, m) for n, m in mods if isinstance(m, nn.Linear)]
    if linears:
        return linears[-1]
    convs = [(n, m) for n, m in mods if isinstance(m, nn.Conv2d) and m.kernel_size == (1, 1)]
    if convs:
        return convs[-1]
    raise ModelError(f"{type(model).__name__} has neither a linear nor a 1x1 convolutional output layer")


def replace_head(model: nn.Module, num_classes: int, seed: int = 0) -> None:
    """A new output layer with num_classes outputs (fine-tuning), initialised from `seed` as
    torchvision initialises that layer; nothing happens when it already has that many."""
    path, old = head(model)
    if (old.out_features if isinstance(old, nn.Linear) else old.out_channels) == num_classes:
        return
    parent = model.get_submodule(path.rsplit(".", 1)[0]) if "." in path else model
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed + 1)
        if isinstance(old, nn.Linear):
            new = nn.Linear(old.in_features, num_classes, bias=old.bias is not None)
        else:  # SqueezeNet's final convolution: torchvision draws it from N(0, 0.01)
            new = nn.Conv2d(old.in_channels, num_classes, kernel_size=1, bias=old.bias is not None)
            nn.init.normal_(new.weight, mean=0.0, std=0.01)
            if new.bias is not None:
                nn.init.zeros_(new.bias)
    setattr(parent, path.rsplit(".", 1)[-1], new.to(old.weight.device))
    if hasattr(model, "num_classes"):
        model.num_classes = num_classes


def outputs(model: nn.Module) -> int:
    _, m = head(model)
    return m.out_features if isinstance(m, nn.Linear) else m.out_channels


def layer_nodes(model: nn.Module, layers: tuple[str, ...]) -> dict[str, str]:
    """Graph node name of each named layer: fc6 / fc7 are the ReLUs after the first two linear
    layers of an AlexNet/VGG-style classifier; prelogit is the input of the head; logits the
    network's output."""
    _, nodes = get_graph_node_names(model)
    linear = {n for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    relu = {n for n, m in model.named_modules() if isinstance(m, nn.ReLU)}
    out = {}
    for layer in layers:
        if layer in CAFFE_LAYERS:
            k = CAFFE_LAYERS.index(layer)
            fcs = [i for i, n in enumerate(nodes) if n in linear]
            after = [next((nodes[j] for j in range(i + 1, len(nodes)) if nodes[j] in relu), None) for i in fcs[:2]]
            if len(fcs) < 3 or after[k] is None:
                raise ModelError(f"layer {layer}: {type(model).__name__} has no AlexNet/VGG-style fully connected "
                                 "layers; use prelogit")
            out[layer] = after[k]
        elif layer == "prelogit":
            last, _ = head(model)
            out[layer] = nodes[nodes.index(last) - 1]
        elif layer == "logits":  # the network's output (exploration labels its images with it)
            out[layer] = nodes[-1]
        else:
            raise ModelError(f"unknown layer {layer!r}: use fc6, fc7 (AlexNet, VGG), prelogit or logits")
    return out


class FeatureExtractor(nn.Module):
    """The model cut after the highest layer asked for (torchvision's FX feature extraction:
    the layers above it are not in the graph, so they never run); returns layer -> (N, dim),
    a feature map (SqueezeNet's prelogit) averaged over its positions."""

    def __init__(self, model: nn.Module, layers: tuple[str, ...] = ("fc7",)):
        super().__init__()
        self.layers = tuple(layers)
        nodes = layer_nodes(model, self.layers)
        self.body = create_feature_extractor(model, return_nodes={node: layer for layer, node in nodes.items()})

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return {k: v.mean((2, 3)) if v.ndim == 4 else torch.flatten(v, 1) for k, v in self.body(x).items()}


def normalise(x: torch.Tensor, mean=IMAGENET_MEAN, std=IMAGENET_STD) -> torch.Tensor:
    """(N, 3, H, W) uint8 -> float32 channels_last (x / 255 - mean) / std, as one multiply-add."""
    scale = torch.tensor([1 / (255 * s) for s in std]).view(1, 3, 1, 1)
    shift = torch.tensor([-m / s for m, s in zip(mean, std)]).view(1, 3, 1, 1)
    out = torch.empty(x.shape, dtype=torch.float32).contiguous(memory_format=torch.channels_last)
    return torch.addcmul(shift, x.float(), scale, out=out)


@dataclass(frozen=True)
class Preprocessing:
    """Resize the shorter side to `resize` (bilinear, antialiased), centre crop `crop`,
    scale to 0..1 and normalise by mean/std: torchvision's ImageClassification transform, applied
    to a whole batch of uint8 HxWx3 images at once; returns channels_last float32."""

    resize: int = 256
    crop: int = 224
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD

    def __call__(self, images: np.ndarray | list[np.ndarray]) -> torch.Tensor:
        """(N, H, W, 3) uint8 (or a list of HxWx3 arrays of any sizes) -> (N, 3, crop, crop) float32."""
        if isinstance(images, np.ndarray) and images.ndim == 4:
            return self._same_size(torch.from_numpy(np.array(images, np.uint8)))
        return torch.cat([self._same_size(torch.from_numpy(np.array(a, np.uint8))[None]) for a in images])

    def _same_size(self, batch: torch.Tensor) -> torch.Tensor:
        x = batch.permute(0, 3, 1, 2)  # a channels_last view of N x H x W x 3
        h, w = x.shape[-2:]
        # the longer side as torchvision computes it: int(resize * long / short)
        size = (self.resize, int(self.resize * w / h)) if h <= w else (int(self.resize * h / w), self.resize)
        if size != (h, w):
            # on uint8, as torchvision's Resize does on uint8 image tensors (its vectorised
            # antialiased kernel: about 10x faster than resizing the float image)
            x = torch.nn.functional.interpolate(x, size=size, mode="bilinear", antialias=True, align_corners=False)
        top, left = (int(round((n - self.crop) / 2.0)) for n in x.shape[-2:])  # as torchvision's center_crop
        return normalise(x[..., top:top + self.crop, left:left + self.crop], self.mean, self.std)


def preprocessing(name: str, weights: str = "none", endpoint: str | None = None,
                  region: str | None = None) -> Preprocessing:
    """The preprocessing that goes with the weights (their card: dl.weights): the enum's own
    sizes and statistics for 'imagenet', the card's for a weights file, ImageNet's for none."""
    from dl.weights import card

    return card(name, weights, endpoint, region).preprocessing
