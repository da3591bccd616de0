"""Where the entry scripts find their data: a user's prepared folder, or the synthetic world, made on demand.

    root, tokenizer_path = ensure_prepared(cfg, ["roco", "medicat", "mimic_cxr"], d, print)

With --data-root, every needed prepared folder must exist (the error prints the prepare command). Without it, rank 0
generates the synthetic world (synth.py) under <synth_root>/<scale>/raw, prepares what is needed under .../prepared and
trains the WordPiece tokenizer on the pre-training texts, saying what it creates; other ranks wait at a barrier.
"""

import os

from . import data, engine, prepare, synth

# prepared folder -> the dataset whose prepare step writes it
SOURCE = {"roco_retrieval": "roco", "mimic_gen": "mimic_cxr", "mimic_sum": "mimic_cxr"}
PRETRAIN_SETS = ("roco", "medicat", "mimic_cxr")
WORLD_SEED = 0  # the synthetic world is one fixed world; --seed varies training, not the data


def ensure_prepared(cfg, names, d, say=print):
    if cfg.data_root:
        root = cfg.data_root
        missing = [n for n in names if not os.path.isfile(os.path.join(root, n, "meta.json"))]
        if missing:
            cmds = "\n  ".join(f"python -m ptunifier_min.prepare {s} --root RAW/{s} --out {root}"
                               for s in sorted({SOURCE.get(n, n) for n in missing}))
            raise SystemExit(f"--data-root {root} has no complete preparation of {', '.join(missing)}; run:\n  {cmds}")
    else:
        base = os.path.join(cfg.synth_root, cfg.synth_scale)
        raw, root = os.path.join(base, "raw"), os.path.join(base, "prepared")
        if not cfg.tokenizer:  # the tokenizer is trained on the pre-training texts, so those must be prepared too
            names = list(names) + list(PRETRAIN_SETS)
        if d.main:
            if not os.path.isfile(os.path.join(raw, "synth_counts.json")):
                say(f"no synthetic world at {raw}: generating it (scale {cfg.synth_scale}, seed {WORLD_SEED})")
                synth.generate(raw, seed=WORLD_SEED, scale=cfg.synth_scale)
            for name in sorted({SOURCE.get(n, n) for n in names
                                if not os.path.isfile(os.path.join(root, n, "meta.json"))}):
                say(f"preparing synthetic {name} into {root}")
                prepare.prepare(name, os.path.join(raw, name), root, seed=WORLD_SEED)
        engine.barrier(d)
    tok_path = cfg.tokenizer or os.path.join(root, "tokenizer.json")
    if not os.path.isfile(tok_path):
        sets = [n for n in PRETRAIN_SETS if os.path.isfile(os.path.join(root, n, "meta.json"))]
        if cfg.tokenizer or not sets:
            raise SystemExit(f"no tokenizer at {tok_path} and no prepared pre-training set under {root} to train one "
                             "from: pass --tokenizer (a tokenizer.json or BERT vocab.txt)")
        if d.main:
            texts = [t for r in data.load_pretrain_records(root, sets, "train") for t in r["texts"]]
            say(f"training a WordPiece tokenizer on {len(texts):,} texts of {', '.join(sets)} -> {tok_path}")
            data.train_tokenizer(texts, cfg.model.vocab_size, tok_path)
        engine.barrier(d)
    return root, tok_path
