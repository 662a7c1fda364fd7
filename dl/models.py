"""CNNs by name with their weights, the preprocessing that belongs to those weights, and named
feature layers: one place that extraction, training and scoring all use.

    model = load_model("alexnet", "none")            # random init (tests, the demo)
    model = load_model("alexnet", "imagenet")        # torchvision's weight enum (needs internet)
    model = load_model("alexnet", "s3://b/ckpt.pt")  # a state_dict saved with torch.save
    pre = preprocessing("alexnet", "imagenet")       # resize 256, centre crop 224, ImageNet mean/std
    fx = FeatureExtractor(model, ("fc6", "fc7"))     # runs the network only up to fc7
    out = fx(pre(uint8_images))                      # {"fc6": (N, 4096), "fc7": (N, 4096)}

Layers: `fc6` and `fc7` are Caffe's names for the first two fully connected layers of AlexNet
and VGG, taken after their ReLU as the original did; `prelogit` is the input of the last
linear layer of any torchvision classifier (ResNet's pooled features, ...).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torchvision
from torch import nn
from torchvision.models.feature_extraction import create_feature_extractor, get_graph_node_names

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CAFFE_LAYERS = ("fc6", "fc7")


class ModelError(ValueError):
    """A model, weights or layer that cannot be had: the message says what to give instead."""


def model_names() -> list[str]:
    return sorted(torchvision.models.list_models(module=torchvision.models))


def _checkpoint(uri: str, endpoint: str | None, region: str | None) -> dict:
    from dl.checkpoint import CheckpointError, load

    try:
        state = load(uri, endpoint, region)
    except CheckpointError as e:
        raise ModelError(f"model weights {e}") from None
    if isinstance(state.get("model"), dict):  # {"model": state_dict, ...}, as training saves it
        state = state["model"]
    return state


AUX_HEADS = ("googlenet", "inception_v3")  # auxiliary classifiers: never used here, always left out


def load_model(name: str, weights: str = "none", num_classes: int | None = None,
               endpoint: str | None = None, region: str | None = None, seed: int = 0, **kwargs) -> nn.Module:
    """A torchvision model in eval mode. weights: 'none' (random init from `seed`: the same
    weights in every worker and on every rerun), 'imagenet' (the model's default weight enum,
    downloaded once into TORCH_HOME) or the URI of a state_dict (local, s3://, gs://; loaded
    with weights_only=True). num_classes replaces the head. GoogLeNet and Inception come
    without their auxiliary classifiers; kwargs go to the torchvision builder (a GoogLeNet
    fine-tuned from ImageNet weights needs transform_input=True, as those weights had)."""
    if name not in model_names():
        raise ModelError(f"unknown model {name!r}: use a torchvision classifier ({', '.join(model_names()[:8])}, ...)")
    if weights == "imagenet":
        enum = torchvision.models.get_model_weights(name).DEFAULT
        try:
            model = torchvision.models.get_model(name, weights=enum, **kwargs)
        except (OSError, RuntimeError) as e:  # URLError is an OSError
            raise ModelError(f"imagenet weights for {name} could not be downloaded ({type(e).__name__}: {e}); this "
                             "needs internet access, or give a checkpoint path (local, s3://, gs://) as the weights")
        if num_classes is not None:
            _replace_head(model, num_classes)
    else:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            if name in AUX_HEADS:
                kwargs = {"aux_logits": False, "init_weights": True, **kwargs}
            model = torchvision.models.get_model(name, weights=None,
                                                 **({"num_classes": num_classes} if num_classes else {}), **kwargs)
        if weights != "none":
            state = _checkpoint(weights, endpoint, region)
            try:
                model.load_state_dict(state)
            except RuntimeError as e:
                raise ModelError(f"model weights {weights} do not fit {name}: {str(e).splitlines()[0]}") from None
    return model.eval()


def _last_linear(model: nn.Module) -> tuple[str, nn.Linear]:
    linears = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise ModelError(f"{type(model).__name__} has no linear layer")
    return linears[-1]


def _replace_head(model: nn.Module, num_classes: int) -> None:
    """A new last linear layer with num_classes outputs (fine-tuning from ImageNet weights)."""
    path, old = _last_linear(model)
    parent = model.get_submodule(path.rsplit(".", 1)[0]) if "." in path else model
    setattr(parent, path.rsplit(".", 1)[-1], nn.Linear(old.in_features, num_classes))


def layer_nodes(model: nn.Module, layers: tuple[str, ...]) -> dict[str, str]:
    """Graph node name of each named layer: fc6 / fc7 are the ReLUs after the first two linear
    layers of an AlexNet/VGG-style classifier; prelogit is the input of the last linear layer."""
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
            last, _ = _last_linear(model)
            out[layer] = nodes[nodes.index(last) - 1]
        else:
            raise ModelError(f"unknown layer {layer!r}: use fc6, fc7 (AlexNet, VGG) or prelogit")
    return out


class FeatureExtractor(nn.Module):
    """The model cut after the highest layer asked for (torchvision's FX feature extraction:
    the layers above it are not in the graph, so they never run); returns layer -> (N, dim)."""

    def __init__(self, model: nn.Module, layers: tuple[str, ...] = ("fc7",)):
        super().__init__()
        self.layers = tuple(layers)
        nodes = layer_nodes(model, self.layers)
        self.body = create_feature_extractor(model, return_nodes={node: layer for layer, node in nodes.items()})

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return {k: torch.flatten(v, 1) for k, v in self.body(x).items()}


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


def preprocessing(name: str, weights: str = "none") -> Preprocessing:
    """The preprocessing that goes with the weights: the enum's own sizes and statistics for
    'imagenet', the same ImageNet defaults for random init and checkpoints fine-tuned from it."""
    if weights == "imagenet":
        t = torchvision.models.get_model_weights(name).DEFAULT.transforms()
        return Preprocessing(resize=int(t.resize_size[0]), crop=int(t.crop_size[0]), mean=tuple(t.mean),
                             std=tuple(t.std))
    return Preprocessing()
