"""Which kernel each attention layer uses at each denoising step: rules, YAML schema, validation.

A policy is a default kernel plus an ordered list of rules. For a call (layer, step) the **first rule
whose conditions all hold** gives the kernel; when none holds, `default` does. Inside a rule every
condition given must hold (AND); inside `steps`, any of `first` / `last` / `range` may hold (OR), so
"first and last step" is one rule.

YAML (all keys but `rules[].kernel` optional)::

    model: flux                  # informational; one of the known families
    default: fp4                 # kernel when no rule matches
    rules:
      - name: precise-edges      # shown in warnings/errors only
        kernel: int8_fp8         # auto | fp4 | int8_fp8 | sdpa | a backend name (see `list_backends()`)
        steps: {first: 1, last: 1, range: [10, 12]}   # step indices within the generation, 0-based
        timesteps: [0.9, 1.0]    # normalised timestep, 1 = pure noise, 0 = clean (inclusive)
        layers: ["transformer_blocks.*"]               # fnmatch globs on module names
        blocks: [0, 3]           # block index range (inclusive), the number after the block list name
        block_types: [double]    # double | single | self | refiner, or one a model module declares

Block types: `double` = blocks with separate text and image weights (Flux, HunyuanVideo, SD3/3.5 and
Mochi `transformer_blocks`); `single` = one set of weights on the joint sequence (Flux and HunyuanVideo
`single_transformer_blocks`, CogVideoX blocks); `self` = SD3.5's image-only `attn2`; `refiner` =
HunyuanVideo's token refiner (always exact SDPA: it has an arbitrary mask).

`auto` is the dispatcher's choice per call (the fastest backend that can run it; see `dispatch`). An empty
policy (an empty file, or neither `default` nor `rules`) is an error: write `default: fp4` for one kernel
everywhere, or use `policy=None` / a bundled policy for the recommended hybrid. `apply` warns, naming the
rule, about a rule that can never match this model (a `layers` glob matching no attention layer, `blocks`
beyond the model's blocks, `block_types` it does not have) and, once the step count is known, about a
`steps` condition beyond the run's steps.

`last` needs the number of steps: known from a pipeline's scheduler (`apply(pipe)`), a
`CacheContext`, or `runtime.num_inference_steps`; when unknown, `last` does not match. When the step
itself is unknown (a forward without `timestep`), no step or timestep condition matches.
"""
from __future__ import annotations

import fnmatch
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path

from ..backends.base import FAMILIES

from . import models as _models

# Both come from the model registry (`integration/models/`): a new family module adds its name and the
# block types it declares.
BLOCK_TYPES = _models.block_types()
MODEL_FAMILIES = _models.names()
_TOP_KEYS = ("model", "default", "rules", "description")
_RULE_KEYS = ("name", "kernel", "steps", "timesteps", "layers", "blocks", "block_types")
_STEP_KEYS = ("first", "last", "range")


class PolicyError(ValueError):
    """A policy file or dict is invalid. The message names the source, the key and what is allowed."""


def allowed_kernels() -> tuple[str, ...]:
    """Kernel names a policy, `apply(kernel=...)` or `Sage3Processor(kernel=...)` accepts: "auto" (the
    dispatcher's choice per call), a family, or a backend name."""
    from ..dispatch import list_backends
    return ("auto",) + tuple(FAMILIES) + tuple(b.name for b in list_backends() if b.name not in FAMILIES)


@dataclass(frozen=True)
class Rule:
    kernel: str
    name: str | None = None
    first_steps: int | None = None
    last_steps: int | None = None
    step_range: tuple[int, int] | None = None
    timesteps: tuple[float, float] | None = None
    layers: tuple[str, ...] | None = None
    blocks: tuple[int, int] | None = None
    block_types: tuple[str, ...] | None = None

    @property
    def has_step_condition(self) -> bool:
        return self.first_steps is not None or self.last_steps is not None or self.step_range is not None

    def matches_layer(self, layer: str, block: int | None, block_type: str | None) -> bool:
        """Whether the layer conditions (layers, blocks, block_types) hold; step conditions are not looked at."""
        if self.layers is not None and not any(fnmatch.fnmatchcase(layer, g) for g in self.layers):
            return False
        if self.blocks is not None and (block is None or not self.blocks[0] <= block <= self.blocks[1]):
            return False
        if self.block_types is not None and block_type not in self.block_types:
            return False
        return True

    def matches(self, layer: str, block: int | None, block_type: str | None, step: int | None,
                num_steps: int | None, t_norm: float | None) -> bool:
        if self.has_step_condition:
            if step is None:
                return False
            hit = ((self.first_steps is not None and step < self.first_steps) or
                   (self.last_steps is not None and num_steps is not None and step >= num_steps - self.last_steps)
                   or (self.step_range is not None and self.step_range[0] <= step <= self.step_range[1]))
            if not hit:
                return False
        if self.timesteps is not None:
            if t_norm is None or not (self.timesteps[0] <= t_norm <= self.timesteps[1]):
                return False
        return self.matches_layer(layer, block, block_type)

    def to_dict(self) -> dict:
        d: dict = {"kernel": self.kernel}
        if self.name is not None:
            d["name"] = self.name
        steps = {}
        if self.first_steps is not None:
            steps["first"] = self.first_steps
        if self.last_steps is not None:
            steps["last"] = self.last_steps
        if self.step_range is not None:
            steps["range"] = list(self.step_range)
        if steps:
            d["steps"] = steps
        if self.timesteps is not None:
            d["timesteps"] = list(self.timesteps)
        if self.layers is not None:
            d["layers"] = list(self.layers)
        if self.blocks is not None:
            d["blocks"] = list(self.blocks)
        if self.block_types is not None:
            d["block_types"] = list(self.block_types)
        return d


@dataclass(frozen=True)
class Policy:
    default: str = "fp4"
    rules: tuple[Rule, ...] = field(default=())
    model: str | None = None
    source: str = "<built-in>"

    def kernel_for(self, layer: str, *, step: int | None = None, num_steps: int | None = None,
                   t_norm: float | None = None, family: str | None = None) -> str:
        block, block_type = layer_block(layer, family or self.model)
        for rule in self.rules:
            if rule.matches(layer, block, block_type, step, num_steps, t_norm):
                return rule.kernel
        return self.default

    def uses_steps(self) -> bool:
        return any(r.has_step_condition or r.timesteps is not None for r in self.rules)

    def to_dict(self) -> dict:
        d: dict = {"default": self.default, "rules": [r.to_dict() for r in self.rules]}
        if self.model:
            d["model"] = self.model
        return d

    @classmethod
    def from_dict(cls, data, source: str = "<dict>") -> "Policy":
        return _parse(data, source)


# Policies shipped with the package, addressable by name (`apply(pipe, "flux")`).
BUNDLED_DIR = Path(__file__).resolve().parent.parent / "configs"


def bundled_policies() -> tuple[str, ...]:
    """Names of the policies shipped with the package (the YAML files in `sage3_diffusers/configs/`)."""
    return tuple(sorted(p.stem for p in BUNDLED_DIR.glob("*.yaml")))


def default_policy() -> Policy:
    """What the SageAttention3 authors recommend: SageAttention2++ (int8_fp8) on the first and last
    denoising steps, SageAttention3 (fp4) elsewhere."""
    return Policy(default="fp4", rules=(Rule(kernel="int8_fp8", name="first-and-last-step", first_steps=1,
                                             last_steps=1),), source="<default policy>")


def fixed_policy(kernel: str, where: str = "the kernel= argument of apply") -> Policy:
    """One kernel for every layer and step. `where` names the argument in error messages."""
    allowed = allowed_kernels()
    if not isinstance(kernel, str) or kernel not in allowed:
        raise PolicyError(f"{where}: unknown kernel {kernel!r}; allowed: {', '.join(allowed)}")
    return Policy(default=kernel, rules=(), source=f"<fixed {kernel}>")


def load_policy(policy=None) -> Policy:
    """A Policy from a YAML path, a dict, a kernel name ("fp4", ...), a Policy, or None (the default policy)."""
    if policy is None:
        return default_policy()
    if isinstance(policy, Policy):
        return policy
    if isinstance(policy, dict):
        return _parse(policy, "<dict>")
    if isinstance(policy, (str, Path)):
        text = str(policy)
        if isinstance(policy, str) and not text.endswith((".yaml", ".yml")) and "/" not in text and \
                not Path(text).exists():
            if text in bundled_policies():
                return load_policy(BUNDLED_DIR / f"{text}.yaml")
            if text not in allowed_kernels():
                raise PolicyError(f"policy {text!r}: not a bundled policy ({', '.join(bundled_policies())}), "
                                  f"a kernel ({', '.join(allowed_kernels())}) or an existing YAML file")
            return fixed_policy(text, "policy")
        path = Path(policy)
        if not path.is_file():
            raise PolicyError(f"{path}: policy file not found")
        import yaml
        try:
            data = yaml.safe_load(path.read_text())
        except yaml.YAMLError as e:
            raise PolicyError(f"{path}: not valid YAML: {e}") from None
        return _parse(data, str(path))
    raise PolicyError(f"policy must be a YAML path, dict, kernel name, Policy or None, got {type(policy).__name__}")


# --------------------------------------------------------------------------------------------- parsing

def layer_block(layer: str, family: str | None = None) -> tuple[int | None, str | None]:
    """(block index, block type) of an attention module name, from the family's declared block types
    (`models.ModelFamily.block_types`); e.g. CogVideoX blocks are single-stream."""
    return _models.layer_block(layer, family)


def _type_name(x) -> str:
    return type(x).__name__


def _check_kernel(value, source, where):
    allowed = allowed_kernels()
    if not isinstance(value, str):
        raise PolicyError(f"{source}: {where}: expected a kernel name (string), got {_type_name(value)} "
                          f"{value!r}; allowed: {', '.join(allowed)}")
    if value not in allowed:
        raise PolicyError(f"{source}: {where}: unknown kernel {value!r}; allowed: {', '.join(allowed)}")
    return value


def _int(value, source, where, minimum=0):
    if isinstance(value, bool) or not isinstance(value, int):
        raise PolicyError(f"{source}: {where}: expected an integer >= {minimum}, got {_type_name(value)} {value!r}")
    if value < minimum:
        raise PolicyError(f"{source}: {where}: expected an integer >= {minimum}, got {value}")
    return value


def _pair(value, source, where, kind):
    if not isinstance(value, (list, tuple)) or len(value) != 2:
        raise PolicyError(f"{source}: {where}: expected a list of two {kind}s [low, high], got {value!r}")
    if kind == "integer":
        lo, hi = (_int(v, source, where) for v in value)
    else:
        for v in value:
            if isinstance(v, bool) or not isinstance(v, (int, float)):
                raise PolicyError(f"{source}: {where}: expected numbers in [0, 1], got {_type_name(v)} {v!r}")
        lo, hi = float(value[0]), float(value[1])
        if not (0.0 <= lo <= 1.0 and 0.0 <= hi <= 1.0):
            raise PolicyError(f"{source}: {where}: normalised timesteps must lie in [0, 1] (1 = pure noise), "
                              f"got [{lo}, {hi}]")
    if lo > hi:
        raise PolicyError(f"{source}: {where}: bad range [{lo}, {hi}]: low must be <= high")
    return (lo, hi)


def _strings(value, source, where, allowed=None):
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, (list, tuple)) or not items or not all(isinstance(s, str) and s for s in items):
        raise PolicyError(f"{source}: {where}: expected a non-empty string or list of strings, got {value!r}")
    if allowed is not None:
        for s in items:
            if s not in allowed:
                raise PolicyError(f"{source}: {where}: unknown value {s!r}; allowed: {', '.join(allowed)}")
    return tuple(items)


def _unknown(keys, allowed, source, where):
    for k in keys:
        if k not in allowed:
            raise PolicyError(f"{source}: {where}unknown key {k!r}; allowed keys: {', '.join(allowed)}")


def _check_model(model, source):
    known_models = _models.names()  # the registry now: includes families registered after import
    if model is not None and model not in known_models:
        raise PolicyError(f"{source}: model: unknown model {model!r}; allowed: {', '.join(known_models)}")
    return model


def _parse(data, source: str) -> Policy:
    if data is None or (isinstance(data, dict) and "default" not in data and not data.get("rules")):
        if isinstance(data, dict):  # name a bad key or model before calling the policy empty
            _unknown(data, _TOP_KEYS, source, "")
            _check_model(data.get("model"), source)
        raise PolicyError(f"{source}: the policy is empty (no 'default', no 'rules'); write 'default: fp4' for "
                          f"one kernel everywhere, or use a bundled policy ({', '.join(bundled_policies())}) or "
                          f"policy=None for the recommended hybrid (int8_fp8 on the first and last steps, fp4 "
                          f"elsewhere)")
    if not isinstance(data, dict):
        raise PolicyError(f"{source}: the top level must be a mapping with keys {', '.join(_TOP_KEYS)}, "
                          f"got {_type_name(data)}")
    _unknown(data, _TOP_KEYS, source, "")
    model = _check_model(data.get("model"), source)
    default = _check_kernel(data.get("default", "fp4"), source, "default")
    rules_data = data.get("rules", [])
    if rules_data is None:
        rules_data = []
    if not isinstance(rules_data, list):
        raise PolicyError(f"{source}: rules: expected a list of rules, got {_type_name(rules_data)}")
    rules = []
    for i, r in enumerate(rules_data):
        where = f"rules[{i}]"
        if not isinstance(r, dict):
            raise PolicyError(f"{source}: {where}: expected a mapping with keys {', '.join(_RULE_KEYS)}, "
                              f"got {_type_name(r)}")
        _unknown(r, _RULE_KEYS, source, f"{where}: ")
        if "kernel" not in r:
            raise PolicyError(f"{source}: {where}: missing required key 'kernel'")
        kw: dict = {"kernel": _check_kernel(r["kernel"], source, f"{where}.kernel")}
        if "name" in r:
            if not isinstance(r["name"], str):
                raise PolicyError(f"{source}: {where}.name: expected a string, got {_type_name(r['name'])}")
            kw["name"] = r["name"]
        if "steps" in r:
            s = r["steps"]
            if not isinstance(s, dict) or not s:
                raise PolicyError(f"{source}: {where}.steps: expected a mapping with any of "
                                  f"{', '.join(_STEP_KEYS)}, got {s!r}")
            _unknown(s, _STEP_KEYS, source, f"{where}.steps: ")
            if "first" in s:
                kw["first_steps"] = _int(s["first"], source, f"{where}.steps.first")
            if "last" in s:
                kw["last_steps"] = _int(s["last"], source, f"{where}.steps.last")
            if "range" in s:
                kw["step_range"] = _pair(s["range"], source, f"{where}.steps.range", "integer")
        if "timesteps" in r:
            kw["timesteps"] = _pair(r["timesteps"], source, f"{where}.timesteps", "number")
        if "layers" in r:
            kw["layers"] = _strings(r["layers"], source, f"{where}.layers")
        if "blocks" in r:
            kw["blocks"] = _pair(r["blocks"], source, f"{where}.blocks", "integer")
        if "block_types" in r:
            kw["block_types"] = _strings(r["block_types"], source, f"{where}.block_types", _models.block_types())
        rules.append(Rule(**kw))
    return Policy(default=default, rules=tuple(rules), model=model, source=source)


# --------------------------------------------------------------------------------------------- rules that never match

def _rule_label(policy: Policy, index: int) -> str:
    rule = policy.rules[index]
    return f"policy {policy.source}: rules[{index}]" + (f" ({rule.name!r})" if rule.name else "")


def _block_list(layer: str) -> tuple[str, int] | None:
    """('transformer_2.blocks', 3) for 'transformer_2.blocks.3.attn1': the block list (with the transformer's
    prefix in a two-transformer pipeline) and the index, read the way `models.layer_block` reads it."""
    parts = layer.split(".")
    for i in range(len(parts) - 2, 0, -1):
        if parts[i].isdigit():
            return ".".join(parts[:i]), int(parts[i])
    return None


def _block_ranges(layers) -> str:
    """'transformer_blocks 0..18, single_transformer_blocks 0..37' for the attention layers."""
    spans: dict = {}
    for layer in layers:
        found = _block_list(layer)
        if found:
            name, idx = found
            lo, hi = spans.get(name, (idx, idx))
            spans[name] = (min(lo, idx), max(hi, idx))
    return ", ".join(f"{name} {lo}..{hi}" for name, (lo, hi) in spans.items()) or "none"


def unmatched_rule_warnings(policy: Policy, layers, family: str | None = None) -> list[str]:
    """Why rules (or parts of rules) of `policy` can never match the attention `layers` of a model: a
    `layers` glob that matches none of them, `blocks` beyond the model's blocks, `block_types` the model
    lacks, `steps.first`/`steps.last` of 0. One message per problem, naming the rule."""
    layers = list(layers)
    placed = [(layer, *layer_block(layer, family)) for layer in layers]
    # Block indices folded to 0; up to six names, so both transformers of a two-transformer pipeline
    # (`transformer_2.…`) show.
    examples = ", ".join(repr(x) for x in sorted({re.sub(r"(?<=\.)\d+(?=\.|$)", "0", x) for x in layers})[:6])
    out = []
    for i, rule in enumerate(policy.rules):
        label = _rule_label(policy, i)
        if not any(rule.matches_layer(*p) for p in placed):
            dead_globs = rule.layers is not None and not any(
                fnmatch.fnmatchcase(x, g) for x in layers for g in rule.layers)
            types = sorted({t for _, _, t in placed if t is not None})
            kept = [p for p in placed if rule.block_types is None or p[2] in rule.block_types]
            if dead_globs:
                why = (f"layers {list(rule.layers)} match no attention layer of this {family or 'model'} model "
                       f"(its attention layers are named like {examples})")
            elif rule.block_types is not None and not kept:
                why = (f"block_types {list(rule.block_types)}: this {family or 'model'} model has only "
                       f"{', '.join(types) or 'no typed'} blocks")
            elif rule.blocks is not None and all(b is None or b < rule.blocks[0] for _, b, _ in kept):
                why = (f"blocks {list(rule.blocks)} lie beyond the model's blocks "
                       f"({_block_ranges([p[0] for p in kept])})")
            else:
                why = "its layers / blocks / block_types conditions together match no attention layer"
            out.append(f"{label} never matches: {why}")
            continue
        for g in rule.layers or ():
            if not any(fnmatch.fnmatchcase(x, g) for x in layers):
                out.append(f"{label}: layers glob {g!r} matches no attention layer of this {family or 'model'} "
                           f"model (its attention layers are named like {examples})")
        for key, value in (("first", rule.first_steps), ("last", rule.last_steps)):
            if value == 0:
                other = rule.first_steps if key == "last" else rule.last_steps
                never = rule.step_range is None and not other
                out.append(f"{label}: steps.{key} 0 matches no step" + (": the rule never matches" if never else ""))
    return out


def steps_beyond_warnings(policy: Policy, num_steps: int) -> list[tuple[int, str]]:
    """(rule index, message) for each rule whose `steps.range` lies beyond a run of `num_steps` steps."""
    out = []
    for i, rule in enumerate(policy.rules):
        if rule.step_range is not None and rule.step_range[0] >= num_steps:
            lo, hi = rule.step_range
            others = rule.first_steps or rule.last_steps
            out.append((i, f"{_rule_label(policy, i)}: steps.range [{lo}, {hi}] lies beyond this run's {num_steps} "
                           f"steps (0..{num_steps - 1}); " +
                        ("that part of the rule never matches" if others else "the rule never matches")))
    return out


def warn_unmatched_rules(policy: Policy, layers, family: str | None = None, stacklevel: int = 3) -> None:
    for msg in unmatched_rule_warnings(policy, layers, family):
        warnings.warn(f"sage3_diffusers: {msg}", UserWarning, stacklevel=stacklevel)


def warn_steps_beyond(policy: Policy, num_steps: int, seen: set, stacklevel: int = 3) -> None:
    """Warn about rules beyond a run of `num_steps` steps, once per (rule, step count) recorded in `seen`."""
    for i, msg in steps_beyond_warnings(policy, num_steps):
        if (i, num_steps) not in seen:
            seen.add((i, num_steps))
            warnings.warn(f"sage3_diffusers: {msg}", UserWarning, stacklevel=stacklevel)
