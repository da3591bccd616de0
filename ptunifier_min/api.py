"""Use a trained checkpoint from Python: ITC embeddings, similarities, ITM match probabilities,
features, predictions.

    import ptunifier_min
    m = ptunifier_min.load("runs/pretrain")          # a run folder (its `latest`) or a step folder
    zi = m.encode_images(["a.jpg", pil_image])       # [N, d] L2-normalised ITC embeddings (fp32)
    zt = m.encode_texts(["pleural effusion", "no effusion"])
    s = m.similarity(zi, zt)                         # cosine x logit scale
    p = m.match(["a.jpg"], ["small left effusion"])  # ITM probability that image i and text i match
    f = m.features(image="a.jpg", text="...")        # pooled [N, 2D] + token states of any pass
    maps = m.ground(["a.jpg"], ["left pleural effusion"])  # [H, W] map of where it looks, per film
    m.predict(image="a.jpg")                          # fine-tuning: label probs, answer or report

Images: a path (str or os.PathLike: JPEG, PNG, DICOM), a PIL image in any mode, a numpy array
[H, W] or [H, W, C] (channels last, as PIL and matplotlib), or a torch tensor [H, W] or [C, H, W]
(channels first, as torchvision), with C = 1 (gray), 3 (RGB order; convert OpenCV's BGR first) or 4
(RGBA), of dtype uint8 (0..255) or float in [0, 1] (x / 255: rounded back to 0..255). Every image
becomes the grayscale film the model sees by one function, grayscale, the one load_image
applies to files: EXIF orientation applied, 16-bit and 32-bit modes rescaled from their min-max,
colour through PIL's luma, alpha dropped; so the same pixels give the same embedding whichever way
they arrive. Other layouts and dtypes (a [N, C, H, W] batch: pass a list; 16-bit arrays: pass
PIL.Image.fromarray(x)) are refused, naming the argument, its index, shape and dtype.
Texts: a str or a list of str (any iterable: a numpy array or a pandas Series too); None or NaN
(pandas' empty cell) is refused naming the argument and index. Arguments read together (images and
texts in match / features, text and text_b in predict) must have equal lengths; empty lists give
empty results.

Loading is safe: weights from safetensors only (trainer.pt, the only pickle, is never read), the
config is checked against this version (unknown keys are an error that lists them), and the
tokenizer and image size come from the checkpoint itself. The model runs in eval mode under
no_grad, in batches, on any device, in fp32 or bf16.
"""

import dataclasses
import json
import math
import numbers
import os

import numpy as np
import torch
from PIL import Image

from .images import ImageTransform, grayscale, load_image
from .tokenizer import encode_pairs, encode_texts, load_tokenizer
from . import config as config_lib
from . import checkpoint, grounding, retrieval, tasks
from .model import PTUnifier


def _image_list(images):
    """One image or a list / tuple of them -> a list (an array or a tensor is one image)."""
    return list(images) if isinstance(images, (list, tuple)) else [images]


def _text_list(texts, name):
    """One text or an iterable of them -> a list of str; anything else is an error naming `name`
    (and the index)."""
    single = isinstance(texts, (str, bytes)) or not hasattr(texts, "__iter__")
    texts = [texts] if single else list(texts)
    for i, t in enumerate(texts):
        if not isinstance(t, str):
            what = ("NaN (pandas reads an empty cell as NaN)"
                    if isinstance(t, float) and math.isnan(t)
                    else "None" if t is None else f"of type {type(t).__name__}")
            raise TypeError(f"{name if single else f'{name}[{i}]'} is {what}, not a str")
    return texts


def _aligned(call, **lists):
    """The common length of the lists given (None = not given); different lengths are an error:
    zipping them would silently drop the unpaired rest."""
    n = {k: len(v) for k, v in lists.items() if v is not None}
    if len(set(n.values())) > 1:
        raise ValueError(f"{call} reads {' and '.join(n)} together, one of each per input: got "
                         + ", ".join(f"{v} in {k}" for k, v in n.items()))
    return next(iter(n.values()), 0)


def _array_image(x, name):
    """A numpy array [H, W] / [H, W, C] or a tensor [H, W] / [C, H, W] (C = 1, 3 or 4), uint8 or
    float in [0, 1] -> a PIL image ("L", "RGB" or "RGBA") of the same pixels."""
    tensor = isinstance(x, torch.Tensor)
    kind, layout = (("tensor", "[H, W] or [C, H, W]") if tensor
                    else ("numpy array", "[H, W] or [H, W, C]"))
    shape, dtype = tuple(x.shape), str(x.dtype)
    channels = shape[0] if tensor else shape[-1]
    if len(shape) not in (2, 3) or (len(shape) == 3 and channels not in (1, 3, 4)) or 0 in shape:
        raise ValueError(f"{name}: a {kind} of shape {shape}; images are {layout} with C = 1, 3 "
                         "or 4 (a batch: pass a list of images)")
    if tensor:
        x = x.detach().cpu()
        x = (x.float() if x.dtype == torch.bfloat16 else x).numpy()
        if x.ndim == 3:
            x = x.transpose(1, 2, 0)  # [C, H, W] -> [H, W, C]
    if np.issubdtype(x.dtype, np.floating):
        lo, hi = float(x.min()), float(x.max())
        if not (0 <= lo and hi <= 1):  # NaN fails both
            raise ValueError(f"{name}: float pixels must lie in [0, 1] (x / 255), got a {kind} "
                             f"with values in [{lo}, {hi}]")
        # rounded, not truncated: the inverse of x / 255 for all 256 values
        x = np.rint(x.astype(np.float64) * 255)
    elif x.dtype != np.uint8:
        raise ValueError(f"{name}: a {kind} of dtype {dtype}; images are uint8 (0..255) or float "
                         "in [0, 1] (16-bit pixels: pass PIL.Image.fromarray(x), which is rescaled "
                         "from its min-max as a 16-bit file is)")
    x = x.astype(np.uint8)
    if x.ndim == 3 and x.shape[2] == 1:
        x = x[..., 0]
    # [H, W] -> "L", [H, W, 3] -> "RGB", [H, W, 4] -> "RGBA"
    return Image.fromarray(np.ascontiguousarray(x))


def to_grayscale(x, name="image"):
    """One image as the API takes it (a path, a PIL image, an array or a tensor: see the module
    docstring) -> the grayscale PIL image the model sees (grayscale, as for files)."""
    if isinstance(x, (str, os.PathLike)):
        return load_image(x)  # its errors name the file
    if isinstance(x, (np.ndarray, torch.Tensor)):
        x = _array_image(x, name)
    if not isinstance(x, Image.Image):
        what = "None" if x is None else f"of type {type(x).__name__}"
        raise TypeError(f"{name} is {what}; an image is a path (str or os.PathLike), a PIL "
                        "image, a numpy array or a torch tensor")
    try:
        return grayscale(x)
    # A truncated or closed file behind a lazily loaded image, a mode PIL cannot convert: PIL says
    # these with OSError, ValueError or a bare AssertionError (closed), none naming the input.
    except Exception as e:
        raise ValueError(f"{name}: cannot read this PIL image (mode {x.mode}, size {x.size}): "
                         f"{type(e).__name__} {e}") from None


class Model:
    """A loaded checkpoint: the model in eval mode, its tokenizer, its image transform and
    (fine-tuning) its task."""

    def __init__(self, model, tok, cfg, task=None, meta=None, device="cpu", dtype=torch.float32,
                 batch_size=32):
        self.model, self.tok, self.cfg, self.task, self.meta = model, tok, cfg, task, meta
        self.backbone = model.backbone if task else model
        self.device, self.dtype, self.batch_size = torch.device(device), dtype, batch_size
        # the evaluation transform: resize + center crop
        self.transform = ImageTransform(cfg.model.image_size)

    @property
    def batch_size(self):
        return self._batch_size

    @batch_size.setter
    def batch_size(self, n):
        # checked here, at load and at any later assignment: range() with a step of 0 is an error
        # that names nothing, and a negative step silently gives no batches at all
        if isinstance(n, bool) or not isinstance(n, numbers.Integral) or n < 1:
            raise ValueError(f"batch_size must be an integer >= 1, got {n!r}")
        self._batch_size = int(n)

    # ---- inputs ----------------------------------------------------------------------------------
    def _images(self, images, name="images", start=0):
        """Images (see the module docstring) -> uint8 pixels [N, 1, S, S] on the model's device,
        which normalises them (in its dtype: its pixel_values buffer was cast with it). `name` and
        `start` (the index of images[0] in the caller's list) name a bad one."""
        x = [self.transform.pixels(to_grayscale(img, f"{name}[{start + i}]"))
             for i, img in enumerate(images)]
        return torch.stack(x).to(self.device)

    def _texts(self, texts, pairs=None):
        """Texts (or text pairs) -> the model's text inputs on its device: input_ids, attention_mask
        and padded, which is read from the host's copy of the mask, so that the model never waits
        for the device to learn it."""
        if pairs is not None:
            ids, mask = encode_pairs(self.tok, texts, pairs, self.cfg.model.max_text_len)
        else:
            ids, mask = encode_texts(self.tok, texts, self.cfg.model.max_text_len)
        return {"input_ids": ids.to(self.device), "attention_mask": mask.to(self.device),
                "padded": not bool(mask.all())}

    def _batches(self, n):
        return [slice(i, i + self.batch_size) for i in range(0, n, self.batch_size)]

    def _empty(self, *shape):
        return torch.zeros(*shape, device=self.device)

    # ---- pre-training heads ----------------------------------------------------------------------
    def encode_images(self, images):
        """[N, d] L2-normalised ITC embeddings of images (one or a list), image-only passes: the
        embeddings of retrieval and evaluation (retrieval.embed_images)."""
        return retrieval.embed_images(self.backbone, _image_list(images),
                                      self.cfg.model.image_size, self.device,
                                      batch_size=self.batch_size,
                                      read=lambda img, i: to_grayscale(img, f"images[{i}]"))

    def encode_texts(self, texts):
        """[N, d] L2-normalised ITC embeddings of texts (one or a list), text-only passes
        (retrieval.embed_texts)."""
        return retrieval.embed_texts(self.backbone, _text_list(texts, "texts"), self.tok,
                                     self.cfg.model.max_text_len, self.device,
                                     batch_size=self.batch_size)

    @torch.no_grad()
    def similarity(self, image_embeddings, text_embeddings):
        """[N_img, N_txt] cosine similarities times the learned logit scale (the ITC logits)."""
        return (image_embeddings.float() @ text_embeddings.float().t()
                * self.backbone.itc_scale().float())

    @torch.no_grad()
    def match(self, images, texts):
        """[N] ITM probability that images[i] and texts[i] match (one fused pass per pair)."""
        images, texts = _image_list(images), _text_list(texts, "texts")
        n = _aligned("match", images=images, texts=texts)
        out = []
        for s in self._batches(n):
            pooled = self.backbone(image=self._images(images[s], start=s.start),
                                   **self._texts(texts[s]), read="pooled").pooled
            out.append(self.backbone.itm_logits(pooled).float().softmax(-1)[:, 1])
        return torch.cat(out) if out else self._empty(0)

    def ground(self, images, texts, method=grounding.DEFAULT):
        """Where the model looks for each sentence on its film: a list of [H, W] float maps, each
        over its image's own pixels (higher = more; grounding.py: method "gradcam", the default,
        from the fusion pass and the ITM head, "similarity" from the dual-encoder passes). images
        and texts pair up one to one."""
        images, texts = _image_list(images), _text_list(texts, "texts")
        n = _aligned("ground", images=images, texts=texts)
        out = []
        for s in self._batches(n):
            films = [to_grayscale(img, f"images[{s.start + i}]") for i, img in enumerate(images[s])]
            pixels = torch.stack([self.transform.pixels(f) for f in films]).to(self.device)
            t = self._texts(texts[s])
            heat = grounding.patch_maps(self.backbone, pixels, t["input_ids"], t["attention_mask"],
                                        method).float().cpu()
            out += [grounding.to_image(h, *f.size) for h, f in zip(heat, films)]
        return out

    @torch.no_grad()
    def features(self, image=None, text=None):
        """The backbone's output for images, texts or pairs (whichever are given; the prompts stand
        in for the other).

        Returns {"pooled": [N, 2D] IMG_CLS ++ CLS, "hidden": [N, T, D] final states (padding
        positions included), "n_visual": where the textual part starts}; empty lists give [0, 2D],
        [0, 0, D] and 0. One batch: call it per chunk for many inputs.
        """
        image = None if image is None else _image_list(image)
        text = None if text is None else _text_list(text, "text")
        if _aligned("features", image=image, text=text) == 0:
            dim = self.cfg.model.dim
            return {"pooled": self._empty(0, 2 * dim), "hidden": self._empty(0, 0, dim),
                    "n_visual": 0}
        kw = {}
        if image is not None:
            kw["image"] = self._images(image, "image")
        if text is not None:
            kw.update(self._texts(text))
        enc = self.backbone(**kw)
        return {"pooled": enc.pooled.float(), "hidden": enc.hidden.float(),
                "n_visual": enc.n_visual}

    # ---- fine-tuned task -------------------------------------------------------------------------
    @torch.no_grad()
    def predict(self, image=None, text=None, text_b=None):
        """The task's output per input: {label: probability} (classification, NLI), the answer
        string (VQA) or the generated text (summarisation, report generation). Pass exactly the
        inputs the task reads (image=, text=, and text_b= for RadNLI's hypotheses), of equal
        lengths."""
        if self.task is None:
            raise ValueError("predict needs a fine-tuning checkpoint; this is a pre-training one "
                             "(use encode_*, match)")
        task = self.task
        # RadNLI reads a pair: premise and hypothesis
        reads = {"image": task.image, "text": bool(task.text), "text_b": task.pair}
        given = {"image": image, "text": text, "text_b": text_b}
        if any(reads[k] != (given[k] is not None) for k in reads):
            raise ValueError(f"task {task.name} reads "
                             + " and ".join(f"{k}=" for k in reads if reads[k])
                             + ", got " + (" and ".join(f"{k}=" for k in given
                                                        if given[k] is not None) or "nothing"))
        image = None if image is None else _image_list(image)
        text = None if text is None else _text_list(text, "text")
        text_b = None if text_b is None else _text_list(text_b, "text_b")
        out = []
        for s in self._batches(_aligned("predict", image=image, text=text, text_b=text_b)):
            batch = {}
            if image is not None:
                batch["image"] = self._images(image[s], "image", s.start)
            if text is not None:
                batch.update(self._texts(text[s], None if text_b is None else text_b[s]))
            # {label: probability}, an answer or a generated text, as the task's kind says
            out += task.kind.predict(self.model, batch, self.tok, self.meta, self.cfg)
        return out


def _config(ckpt):
    """The run's config from <ckpt>/config.json; keys this version does not know are an error
    listing them."""
    saved = checkpoint.read_checkpoint_config(ckpt)["config"]
    cls = config_lib.FinetuneConfig if "task" in saved else config_lib.TrainConfig
    known_run = {f.name for f in dataclasses.fields(cls)} - {"model"}
    known_model = {f.name for f in dataclasses.fields(config_lib.ModelConfig)}
    unknown = (sorted(set(saved) - known_run - {"model"})
               + sorted(f"model.{k}" for k in set(saved.get("model", {})) - known_model))
    if unknown or "model" not in saved:
        raise checkpoint.CheckpointError(
            f"{os.path.join(ckpt, 'config.json')} is from another version of ptunifier-min: keys "
            f"this version does not know: {', '.join(unknown) or 'no model section'}")
    for k in ("image_size", "max_text_len"):
        if k not in saved["model"]:
            raise checkpoint.CheckpointError(
                f"{os.path.join(ckpt, 'config.json')}: no model.{k} (the image transform and the "
                "text length depend on it)")
    return config_lib.from_dict(cls, saved)


def load(path, device="cpu", dtype=torch.float32, batch_size=32):
    """Load a pre-training or fine-tuning checkpoint (run folder or step folder) for inference.
    batch_size: inputs per forward pass (an integer >= 1; Model.batch_size may be changed later)."""
    return Model(*load_checkpoint(path, device, dtype), device, dtype, batch_size)


def load_checkpoint(path, device="cpu", dtype=torch.float32):
    """(model, tokenizer, config, task, meta) of a pre-training or fine-tuning checkpoint (run or
    step folder): the backbone, or the fine-tuned TaskModel with its task and meta.json (task and
    meta None for pre-training), in eval mode, without gradients. The one loader of the API, eval.py
    and the tools."""
    ckpt = checkpoint.resolve_checkpoint(path)
    cfg = _config(ckpt)
    tok = load_tokenizer(checkpoint.checkpoint_tokenizer(ckpt))
    if tok.get_vocab_size() != cfg.model.vocab_size:
        raise checkpoint.CheckpointError(
            f"{checkpoint.checkpoint_tokenizer(ckpt)} has {tok.get_vocab_size()} tokens, the "
            f"model in {ckpt} {cfg.model.vocab_size}")
    backbone = PTUnifier(cfg.model)
    task = meta = None
    model = backbone
    if isinstance(cfg, config_lib.FinetuneConfig):
        task = tasks.get_task(cfg.task)
        meta_path = os.path.join(ckpt, "meta.json")
        if not os.path.isfile(meta_path):
            raise checkpoint.CheckpointError(
                f"{meta_path} not found: a fine-tuning checkpoint needs its task's label names / "
                "answers (finetune.py copies meta.json into it)")
        with open(meta_path) as f:
            meta = json.load(f)
        model = tasks.TaskModel(backbone, task, tasks.num_outputs(task, meta), cfg.max_gen_len)
    # lists missing, unexpected and mis-shaped tensors
    checkpoint.load_weights(ckpt, model, strict=True)
    model.to(device=device, dtype=dtype).eval().requires_grad_(False)
    return model, tok, cfg, task, meta

