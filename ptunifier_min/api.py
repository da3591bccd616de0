"""Use a trained checkpoint from Python: ITC embeddings, similarities, ITM match probabilities,
features, predictions.

    import ptunifier_min
    m = ptunifier_min.load("runs/pretrain")          # a run folder (its `latest`) or a step folder
    zi = m.encode_images(["a.jpg", pil_image])       # [N, d] L2-normalised ITC embeddings (fp32)
    zt = m.encode_texts(["pleural effusion", "no effusion"])
    s = m.similarity(zi, zt)                         # cosine x logit scale
    p = m.match(["a.jpg"], ["small left effusion"])  # ITM probability that image i and text i match
    f = m.features(image="a.jpg", text="...")        # pooled [N, 2D] + token states of any pass
    m.predict(image="a.jpg")                          # fine-tuning: label probs, answer or report

Loading is safe: weights from safetensors only (trainer.pt, the only pickle, is never read), the
config is checked against this version (unknown keys are an error that lists them), and the
tokenizer and image size come from the checkpoint itself. The model runs in eval mode under
no_grad, in batches, on any device, in fp32 or bf16.
"""

import dataclasses
import json
import os

import torch

from . import config as config_lib
from . import checkpoint, data, tasks
from .generation import beam_search, encoder_memory
from .model import PTUnifier


def _as_list(x):
    return list(x) if isinstance(x, (list, tuple)) else [x]


class Model:
    """A loaded checkpoint: the model in eval mode, its tokenizer, its image transform and
    (fine-tuning) its task."""

    def __init__(self, model, tok, cfg, task=None, meta=None, device="cpu", dtype=torch.float32,
                 batch_size=32):
        self.model, self.tok, self.cfg, self.task, self.meta = model, tok, cfg, task, meta
        self.backbone = model.backbone if task else model
        self.device, self.dtype, self.batch_size = torch.device(device), dtype, batch_size
        # the evaluation transform: resize + center crop
        self.transform = data.ImageTransform(cfg.model.image_size)

    # ---- inputs ----------------------------------------------------------------------------------
    def _images(self, images):
        """Paths or PIL images -> uint8 pixels [N, 1, S, S] on the model's device, which normalises
        them (in its dtype: its pixel_values buffer was cast with it)."""
        x = [self.transform.pixels(data.load_image(i) if isinstance(i, (str, os.PathLike))
                                   else i.convert("L"))
             for i in images]
        return torch.stack(x).to(self.device)

    def _texts(self, texts, pairs=None):
        """Texts (or text pairs) -> the model's text inputs on its device: input_ids, attention_mask
        and padded, which is read from the host's copy of the mask, so that the model never waits
        for the device to learn it."""
        if pairs is not None:
            ids, mask = data.encode_pairs(self.tok, texts, pairs, self.cfg.model.max_text_len)
        else:
            ids, mask = data.encode_texts(self.tok, texts, self.cfg.model.max_text_len)
        return {"input_ids": ids.to(self.device), "attention_mask": mask.to(self.device),
                "padded": not bool(mask.all())}

    def _batches(self, n):
        return [slice(i, i + self.batch_size) for i in range(0, n, self.batch_size)]

    # ---- pre-training heads ----------------------------------------------------------------------
    @torch.no_grad()
    def encode_images(self, images):
        """[N, d] L2-normalised ITC embeddings of images (paths or PIL images), image-only
        passes."""
        images = _as_list(images)
        backbone = self.backbone
        return torch.cat([backbone.itc_embed(backbone(image=self._images(images[s]), read="pooled"))
                          for s in self._batches(len(images))])

    @torch.no_grad()
    def encode_texts(self, texts):
        """[N, d] L2-normalised ITC embeddings of texts, text-only passes."""
        texts, backbone = _as_list(texts), self.backbone
        out = []
        for s in self._batches(len(texts)):
            out.append(backbone.itc_embed(backbone(**self._texts(texts[s]), read="pooled")))
        return torch.cat(out)

    @torch.no_grad()
    def similarity(self, image_embeddings, text_embeddings):
        """[N_img, N_txt] cosine similarities times the learned logit scale (the ITC logits)."""
        return (image_embeddings.float() @ text_embeddings.float().t()
                * self.backbone.itc_scale().float())

    @torch.no_grad()
    def match(self, images, texts):
        """[N] ITM probability that images[i] and texts[i] match (one fused pass per pair)."""
        images, texts = _as_list(images), _as_list(texts)
        if len(images) != len(texts):
            raise ValueError(f"match takes pairs: {len(images)} images vs {len(texts)} texts")
        out = []
        for s in self._batches(len(images)):
            pooled = self.backbone(image=self._images(images[s]), **self._texts(texts[s]),
                                   read="pooled").pooled
            out.append(self.backbone.itm_logits(pooled).float().softmax(-1)[:, 1])
        return torch.cat(out)

    @torch.no_grad()
    def features(self, image=None, text=None):
        """The backbone's output for images, texts or pairs (whichever are given; the prompts stand
        in for the other).

        Returns {"pooled": [N, 2D] IMG_CLS ++ CLS, "hidden": [N, T, D] final states (padding
        positions included), "n_visual": where the textual part starts}. One batch: call it per
        chunk for many inputs.
        """
        kw = {}
        if image is not None:
            kw["image"] = self._images(_as_list(image))
        if text is not None:
            kw.update(self._texts(_as_list(text)))
        enc = self.backbone(**kw)
        return {"pooled": enc.pooled.float(), "hidden": enc.hidden.float(),
                "n_visual": enc.n_visual}

    # ---- fine-tuned task -------------------------------------------------------------------------
    @torch.no_grad()
    def predict(self, image=None, text=None, text_b=None):
        """The task's output per input: {label: probability} (classification, NLI), the answer
        string (VQA) or the generated text (summarisation, report generation)."""
        if self.task is None:
            raise ValueError("predict needs a fine-tuning checkpoint; this is a pre-training one "
                             "(use encode_*, match)")
        task = self.task
        if task.head == "itc":
            raise ValueError("a retrieval checkpoint has no predict: use encode_images / "
                             "encode_texts / similarity")
        pair = len(task.text) == 2  # RadNLI: premise and hypothesis
        n = len(_as_list(image if image is not None else text))
        out = []
        for s in self._batches(n):
            batch = {}
            if task.image:
                if image is None:
                    raise ValueError(f"task {task.name} reads an image: pass image=")
                batch["image"] = self._images(_as_list(image)[s])
            if task.text:
                if text is None or (pair and text_b is None):
                    raise ValueError(f"task {task.name} reads "
                                     + ("text= and text_b=" if pair else "text="))
                b = _as_list(text_b)[s] if pair else None
                batch.update(self._texts(_as_list(text)[s], b))
            out += self._predict_batch(batch)
        return out

    def _predict_batch(self, batch):
        task, m = self.task, self.model
        if task.head == "decoder":
            sp = data.special_ids(self.tok)
            memory, memory_mask = encoder_memory(m.backbone, **m.encoder_inputs(batch))
            ids = beam_search(m.decoder, memory, memory_mask, sp["cls"], sp["sep"], sp["pad"],
                              self.cfg.beam_size, self.cfg.max_gen_len - 1,
                              self.cfg.length_penalty)
            return [self.tok.decode(i) for i in ids]
        logits = m(batch).float()
        if task.width == "answers":
            return [self.meta["answers"][i] for i in logits.argmax(-1).tolist()]
        names = self.meta.get("label_names") or [task.name]
        # one class vs independent labels
        probs = logits.softmax(-1) if task.loss == "ce" else logits.sigmoid()
        return [dict(zip(names, row)) for row in probs.tolist()]


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
    """Load a pre-training or fine-tuning checkpoint (run folder or step folder) for inference."""
    ckpt = checkpoint.resolve_checkpoint(path)
    cfg = _config(ckpt)
    tok = data.load_tokenizer(checkpoint.checkpoint_tokenizer(ckpt))
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
    return Model(model, tok, cfg, task, meta, device, dtype, batch_size)

