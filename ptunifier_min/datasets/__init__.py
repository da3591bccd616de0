"""The data plumbing, apart from the method: where the datasets come from, not how the model learns
from them.

    synth.py    the synthetic mirror of the nine datasets in their official layouts
                (python -m ptunifier_min.datasets.synth --out data/raw)
    prepare.py  official layouts -> the prepared folders data.py reads
                (python -m ptunifier_min.datasets.prepare DATASET --root RAW --out DIR)
    source.py   ensure_prepared: find a user's --data-root, or make the embedded synthetic world
                on demand

The method modules (config, model, objectives, data, tasks, ...) never import this sub-package;
only the entry scripts do, through source.ensure_prepared, which loads synth and prepare only when
it must make the embedded world.
"""
