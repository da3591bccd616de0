"""Typed config fields: each carries its help text and what values it allows, in one place; the
model's config (model.py) and the run configs (config.py) are made of them.

    lr: float = option(1e-3, "peak learning rate", valid="> 0", may_change=True)
    check_fields(cfg)   # one ValueError naming every field outside what it allows
"""

import dataclasses
import math


def option(default, help, valid=None, may_change=False):
    """A config field and what is allowed of it.

    valid: the values allowed, checked whenever a config is built (so by parse_args, before any data
    is read): a bound (">= 1", "> 0"), an interval ("[0, 1)"), alternatives joined by " or " (a bare
    number is that value), or a tuple of choices. may_change: a resumed run may set it differently
    from the run it continues, because it steers how the run goes on (length, cadence, learning
    rates, workers), not what it learns; every other field must equal the checkpoint's."""
    return dataclasses.field(default=default,
                             metadata={"help": help, "valid": valid, "may_change": may_change})


def flag(name):
    """The command-line flag of a field: pool_size -> --pool-size."""
    return "--" + name.replace("_", "-")


def allowed(value, valid):
    if isinstance(valid, tuple):
        return value in valid
    for part in valid.split(" or "):
        if part[0] in "[(":  # an interval such as "[0, 1)"
            lo, hi = (float(x) for x in part[1:-1].split(","))
            if ((lo <= value if part[0] == "[" else lo < value)
                    and (value <= hi if part[-1] == "]" else value < hi)):
                return True
        elif " " in part:  # ">= 1", "> 0"
            op, bound = part.split()
            if value >= float(bound) if op == ">=" else value > float(bound):
                return True
        elif value == float(part):
            return True
    return False


def check_fields(cfg):
    """Raise one ValueError naming every field of this dataclass whose value is outside what its
    `valid` allows (and every non-finite float: argparse's float() accepts 'nan' and 'inf')."""
    errors = []
    for f in dataclasses.fields(cfg):
        value, valid = getattr(cfg, f.name), f.metadata.get("valid")
        if isinstance(value, float) and not math.isfinite(value):
            errors.append(f"{flag(f.name)} must be a finite number, got {value}")
        elif valid is not None and not allowed(value, valid):
            what = f"one of {' | '.join(valid)}" if isinstance(valid, tuple) else \
                f"{'in ' if valid[0] in '[(' else ''}{valid}"
            errors.append(f"{flag(f.name)} must be {what}, got {value!r}")
    if errors:
        raise ValueError("; ".join(errors))
