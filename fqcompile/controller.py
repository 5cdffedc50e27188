"""The precision controller: each unit's precision, step by step, from the switching policy.

It hooks the model's forward. Before a call: a prompt (more than one new token per row,
or no signal yet) runs at the prefill precision; a decode step runs every unit at the
precision the policy gives for the bucket of each row's signal (rows are independent:
FlexLinear runs rows at different precisions through their own slices). After a call:
the entropy of each row's last next-token distribution becomes the next step's signal.
That works under Hugging Face `generate` (sampling, streaming, stopping criteria and
batches are untouched) and under the "as served" evaluation in evaluation.py.

An error-estimate policy (calibration/estimate.py) gives some units a rule instead of a
fixed precision: right before such a unit runs, its first layer's gate takes the mean
square of each row's input and the rule of the row's bucket gives the precision of the
whole unit (FlexLinear.gate; every engine calls it, the slim decoder's fused calls too).
"""

import bisect
import time
from dataclasses import dataclass

import torch

from .calibration import estimate
from .calibration import policy as pol
from .errors import FqError
from .flex_linear import FlexLinear, set_gate, set_precisions
from .formats import checkpoint as ckpt
from .kernels.ops import entropy


@dataclass
class Plan:
    """A resolved policy: per entropy bucket, the bits of every unit (or its rule on its input)."""

    label: str
    units: list[list[str]]  # module names per unit
    edges: list[float]
    bits: torch.Tensor  # [buckets, units] long (with rules: the highest precision each rule gives)
    prefill: int
    smoothing: float = 0.0
    rules: dict | None = None  # {"edges": [bucket][unit][..], "bits": [bucket][unit][..]}: estimate.rules


def _rule_plan(label, units, edges, rules, prefill, smoothing) -> Plan:
    top = torch.tensor([[max(b) for b in row] for row in rules["bits"]])
    return Plan(label, units, edges, top, prefill, smoothing, rules)


def resolve(policy: dict, manifest: dict, spec: str | None) -> Plan:
    """Turn a --policy spec into a Plan: dynamic, dynamic:BITS, static:B or static-mixed:BITS.

    Without a spec: the checkpoint's own policy (dynamic if it was exported with --calib).
    """
    ladder = list(manifest["ladder"])
    kind, _, arg = (spec or ("dynamic" if policy.get("kind") == "dynamic" else f"static:{ladder[-1]}")).partition(":")
    if kind == "static":
        bits = int(arg) if arg else ladder[-1]
        if bits not in ladder:
            raise FqError(f"precision {bits} is not in the ladder {ladder}")
        return Plan(f"static:{bits}", [list(manifest["modules"])], [], torch.tensor([[bits]]), bits)
    if kind not in ("dynamic", "static-mixed"):
        raise FqError(f"unknown policy '{spec}' (use dynamic, dynamic:BITS, static:B or static-mixed:BITS)")
    if policy.get("kind") != "dynamic":
        raise FqError(f"policy '{spec}' needs a calibrated checkpoint (export with `calib`)")
    slices = policy.get("calibration", {}).get("slices", "rtn")
    if slices != "rtn" and slices != ckpt.slices_fingerprint(manifest):
        raise FqError("this checkpoint's policy was fitted to other weights than its own: calibrate it again with "
                      "`checkpoint`")
    units = [u["modules"] for u in policy["units"]]
    edges, smoothing, prefill = policy["bucket_edges"], policy["signal"]["smoothing"], policy["prefill_precision"]
    if kind == "dynamic" and not arg:
        if "rules" in policy:
            return _rule_plan("dynamic", units, edges, policy["rules"], prefill, smoothing)
        return Plan("dynamic", units, edges, torch.tensor(policy["plans"]), prefill, smoothing)
    try:
        target = float(arg)
    except ValueError:
        raise FqError(f"policy '{spec}': expected a number of average bits after ':'") from None
    table = policy["table"]
    dkl = torch.tensor(table["dkl"], dtype=torch.float64)
    base = torch.tensor(table["base"], dtype=torch.float64)
    share = torch.tensor(table["bucket_share"], dtype=torch.float64)
    shares = torch.tensor([u["weight_share"] for u in policy["units"]], dtype=torch.float64)
    ladder_t = torch.tensor(ladder)
    if kind == "static-mixed":
        idx = pol.static_mixed(dkl, base, share, shares, ladder, target)
        return Plan(f"static-mixed:{target:g}", units, [], ladder_t[idx][None], prefill)
    if "estimate" in policy:
        fitted = estimate.table(policy["estimate"], base, share)
        lam = pol.fit(*fitted, shares, ladder, target_bits=target)
        return _rule_plan(f"dynamic:{target:g}", units, edges, estimate.rules(policy["estimate"], lam, shares, ladder),
                          prefill, smoothing)
    lam = pol.fit(dkl, base, share, shares, ladder, target_bits=target)
    return Plan(f"dynamic:{target:g}", units, edges, ladder_t[pol.plans(dkl, shares, ladder, lam)], prefill, smoothing)


class Controller:
    """Attach to a loaded checkpoint model; `stats()` reports what it did."""

    def __init__(self, model, manifest: dict, plan: Plan):
        self.plan = plan
        self.ladder = list(manifest["ladder"])
        self.layers = [[model.get_submodule(n) for n in names] for names in plan.units]
        for layer in (m for unit in self.layers for m in unit):
            if not isinstance(layer, FlexLinear):
                raise FqError("the policy names a layer that is not quantized in this checkpoint")
            needed = {b for row in plan.rules["bits"] for bits in row for b in bits} if plan.rules else set()
            if not needed | set(plan.bits.flatten().tolist()) | {plan.prefill} <= set(layer.precisions):
                raise FqError(f"policy {plan.label} needs precisions that were not loaded")
        # Per bucket, once: each unit's ladder position and the bytes a step reads (planes +
        # scales/zeros), so a decode step only counts how many rows fell in each bucket.
        layouts = ckpt.layouts(manifest)
        unit_bytes = torch.tensor([[sum(ckpt.bytes_read(layouts[n], b) for n in names) for b in self.ladder]
                                   for names in plan.units], dtype=torch.float64)
        position = torch.searchsorted(torch.tensor(self.ladder), plan.bits)  # [buckets, units]
        self.bucket_counts = torch.nn.functional.one_hot(position, len(self.ladder)).double()  # [buckets, units, rungs]
        # Units whose rule switches on their input: their gate sets and counts them, not the bucket.
        self.gated = {u: [(edges[u], bits[u]) for edges, bits in zip(plan.rules["edges"], plan.rules["bits"])]
                      for u in range(len(plan.units)) if any(edges[u] for edges in plan.rules["edges"])} \
            if plan.rules else {}
        fixed = torch.ones(len(plan.units), dtype=torch.float64)
        fixed[list(self.gated)] = 0
        self.bucket_counts *= fixed[None, :, None]
        self.bucket_bytes = (unit_bytes.gather(1, position.T) * fixed[:, None]).sum(0)  # [buckets]
        self.unit_bytes = unit_bytes.tolist()
        self.plan_ids = torch.unique(plan.bits, dim=0, return_inverse=True)[1].tolist()  # equal bits, one id
        self.unit_bits = [[None if u in self.gated else b for u, b in enumerate(row)] for row in plan.bits.tolist()]
        self.edge_list = list(plan.edges)
        self.weights = sum(x.out_features * x.in_features for x in layouts.values())
        self.trace = None  # a list: every gate decision is appended as (unit, [ms per row], [bits per row])
        self.rung = {b: i for i, b in enumerate(self.ladder)}
        self.ladder_t, self.bytes_t = torch.tensor(self.ladder, dtype=torch.float64), unit_bytes
        self._one, self._stack_rules = torch.ones(1, dtype=torch.float64), None
        self.reset()
        self.hooks = []
        self.attach(model)
        for u, layers in enumerate(self.layers):  # a gate another controller left is not ours to follow
            set_gate(layers[0], self._gate(u) if u in self.gated else None)

    def attach(self, module) -> None:
        """Watch `module`'s forward calls instead (e.g. the slim decoder over the same layers)."""
        for h in self.hooks:
            h.remove()
        self.hooks = [module.register_forward_pre_hook(self._before, with_kwargs=True),
                      module.register_forward_hook(self._after)]

    def reset(self) -> None:
        """Forget the signal (a new prompt) and the statistics."""
        self.signal = None
        self.buckets = None  # each row's bucket in this decode step (None: a prompt)
        self.token_buckets = None  # run_tokens: [B, T] buckets of whole teacher-forced sequences
        self.token_bits = {}
        self.steps = [0] * len(self.plan.bits)  # decode row-steps per bucket
        self.gate_counts = [[0] * len(self.ladder) for _ in self.layers]  # gated units: row-steps per rung
        self.gate_bytes = 0.0
        self.stack_counts = torch.zeros(len(self.layers), len(self.ladder), dtype=torch.float64)  # count_stack
        self.overhead = 0.0
        self.applied = None  # the rows' plan ids whose bits were last set on the layers
        self.unit_now = [None] * len(self.layers)  # the bits last set on each unit (None: unknown)

    def close(self) -> None:
        for h in self.hooks:
            h.remove()
        for u in self.gated:
            if getattr(self.layers[u][0].gate, "controller", None) is self:  # a later controller's gates stay
                set_gate(self.layers[u][0], None)

    def _gate(self, u: int) -> "Gate":
        return Gate(self, u, self.gated[u], self.layers[u])

    def count(self, u: int, ms: list[float], bits: list[int]) -> None:
        """Gated unit u ran its rows at `bits` (decided on inputs of mean square `ms`)."""
        counts, unit_bytes = self.gate_counts[u], self.unit_bytes[u]  # reset() replaces the lists
        for b in bits:
            r = self.rung[b]
            counts[r] += 1
            self.gate_bytes += unit_bytes[r]
        if self.trace is not None:
            self.trace.append((u, ms, bits))

    def count_stack(self, rules, chosen: torch.Tensor) -> None:
        """What the C++ stack chose for its gated slots (slim.py): chosen [slots, 2] (bits, ms).

        A few tensor ops a step, not a Python loop over ~100 units (~1 us each)."""
        start = time.perf_counter()
        if self.trace is not None:  # tests compare every decision: the slow path
            rows = chosen.tolist()
            for rule in rules:
                if rule.follow < 0:
                    bits, ms = rows[rule.row]
                    self.count(rule.gate.unit, [ms], [int(bits)])
        else:
            if self._stack_rules is not rules:  # the same list object while the plan stays
                leaders = [r for r in rules if r.follow < 0]
                self._stack_rows = torch.tensor([r.row for r in leaders])
                self._stack_units = torch.tensor([r.gate.unit for r in leaders])
                self._stack_rules = rules
            rung = torch.searchsorted(self.ladder_t, chosen[self._stack_rows, 0])
            self.stack_counts.index_put_((self._stack_units, rung), self._one, accumulate=True)
        self.overhead += time.perf_counter() - start

    def count_tokens(self, u: int, bits: torch.Tensor) -> None:
        """Gated unit u ran the positions of `bits` (a tensor of precisions) at those precisions."""
        for b, r in self.rung.items():
            n = int((bits == b).sum())
            self.gate_counts[u][r] += n
            self.gate_bytes += n * self.unit_bytes[u][r]

    def run_tokens(self, buckets) -> None:
        """Teacher-forced mode: each later forward runs whole sequences, position t of row r at the
        plan of bucket buckets[r, t] (position 0, the prompt, at the prefill precision), with gated
        units deciding every position from its own input; None: back to step by step. A causal
        model computes position t from positions <= t only, so this is what serving would run."""
        self.token_buckets = buckets
        self.signal = self.buckets = None
        if buckets is not None:
            self.token_bits = {}  # gated unit -> the [B, T] precisions its gate chose in this pass

    def count_passes(self, buckets, gated: dict) -> None:
        """Count teacher-forced rows as served: `buckets` [B, T] and each gated unit's precisions
        [B, T] (position 0, the prompt, is not a decode step)."""
        for k, n in enumerate(torch.bincount(buckets[:, 1:].flatten(), minlength=len(self.steps)).tolist()):
            self.steps[k] += n
        for u, bits in gated.items():
            self.count_tokens(u, bits[:, 1:])

    def _set_tokens(self) -> None:
        buckets = self.token_buckets
        per = self.plan.bits[buckets]  # [B, T, units]
        per[:, 0] = self.plan.prefill
        for u, layers in enumerate(self.layers):
            if u not in self.gated:
                column = per[..., u]
                set_precisions(layers, int(column[0, 0]) if bool((column == column[0, 0]).all()) else column)
        self.unit_now = [None] * len(self.layers)

    def _before(self, _model, args, kwargs):
        start = time.perf_counter()
        if self.token_buckets is not None:
            self._set_tokens()
            self.overhead += time.perf_counter() - start
            return
        ids = kwargs.get("input_ids", args[0] if args else None)
        if ids is None:
            ids = kwargs["inputs_embeds"]
        rows, new = ids.shape[0], ids.shape[1]
        if self.signal is None or new > 1 or len(self.signal) != rows:
            self.signal = self.buckets = None
            self.unit_now = [None] * len(self.layers)  # a new prompt: set every unit, whatever set them last
            self._set([self.plan.prefill] * len(self.layers))
            self.applied = None
        else:
            # Plain Python over a few rows: a dozen tiny tensor ops would cost ~100 us a step.
            buckets = self.buckets = [bisect.bisect_right(self.edge_list, s) for s in self.signal]
            plans = [self.plan_ids[b] for b in buckets]
            # Setting ~200 layers costs more than the rest of the hook: only when the plan changes.
            if plans != self.applied:
                if len(set(plans)) == 1:
                    self._set(self.unit_bits[buckets[0]])
                else:  # rows at different plans: per-row precision tensors where the rows disagree
                    columns = zip(*(self.unit_bits[b] for b in buckets))  # per unit, each row's bits
                    self._set([col[0] if len(set(col)) == 1 else torch.tensor(col) for col in columns])
                self.applied = plans
            for b in buckets:
                self.steps[b] += 1
        self.overhead += time.perf_counter() - start

    def _after(self, _model, _args, output):
        if self.token_buckets is not None:  # the caller computes the signal of teacher-forced passes
            return
        start = time.perf_counter()
        if not self.edge_list:  # one bucket (static plans): the signal's value is never read
            self.signal = [0.0] * output.logits.shape[0]
            self.overhead += time.perf_counter() - start
            return
        # Per row, in plain Python: a few rows. A decode step's logits go in as they are: each
        # torch call here runs cold (the step's weights just streamed through the caches).
        logits = output.logits
        if logits.shape[1] != 1:  # a prompt: its last position's distribution only
            logits = logits[:, -1:]
        h = [row[0] for row in entropy(logits).tolist()]
        s = self.plan.smoothing
        self.signal = h if self.signal is None or not s else [s * a + (1 - s) * b for a, b in zip(self.signal, h)]
        self.overhead += time.perf_counter() - start

    def _set(self, per_unit) -> None:
        # Only the units whose bits change (a few of ~30 between neighbouring buckets): after a
        # step has streamed the weights, each layer touched is a cache miss (~100 us for all).
        now = self.unit_now
        for u, (layers, bits) in enumerate(zip(self.layers, per_unit)):
            if bits is None:  # a gated unit: its gate sets it
                continue
            if type(bits) is not int or type(now[u]) is not int or now[u] != bits:
                set_precisions(layers, bits)
            now[u] = bits

    def stats(self, verbose: bool = False) -> dict:
        """Decode steps only (the prompt runs at the prefill precision)."""
        steps = torch.tensor(self.steps, dtype=torch.float64)
        counts = torch.einsum("b,bur->ur", steps, self.bucket_counts)  # [units, rungs] row-steps
        counts += torch.tensor(self.gate_counts, dtype=torch.float64) + self.stack_counts
        total = counts.sum()
        tokens = int(steps.sum())
        shares = (counts.sum(0) / total).tolist() if total else [0.0] * len(self.ladder)
        read = float(steps @ self.bucket_bytes) + self.gate_bytes + float((self.stack_counts * self.bytes_t).sum())
        out = {
            "policy": self.plan.label,
            "decode_tokens": tokens,
            "avg_bits_read": 8 * read / (tokens * self.weights) if tokens else None,
            "share": {str(b): s for b, s in zip(self.ladder, shares)},
            "controller_seconds": self.overhead,
        }
        if verbose:
            out["per_unit"] = {pol.unit_label(names): {
                str(b): float(c / max(1.0, counts[u].sum())) for b, c in zip(self.ladder, counts[u])}
                for u, names in enumerate(self.plan.units)}
        return out


class Gate:
    """A gated unit's decision, run by its first layer (FlexLinear.gate) right before it computes:
    the mean square of each row's input, the rule of the row's bucket, the precision of every
    layer of the unit. The slim decoder's C++ stack runs the same rules itself (slim.py)."""

    def __init__(self, controller: Controller, unit: int, rules: list, layers: list):
        self.controller, self.unit, self.layers = controller, unit, layers
        self.rules = rules  # per bucket: (edges, bits)

    def __call__(self, x) -> None:
        c = self.controller
        if c.token_buckets is not None:
            return self._tokens(x)
        if c.buckets is None:  # a prompt: the prefill precision stays
            return
        start = time.perf_counter()
        ms = estimate.input_ms(x[:, -1]).tolist()
        bits = [estimate.decide(*self.rules[b], m) for b, m in zip(c.buckets, ms)]
        value = bits[0] if bits.count(bits[0]) == len(bits) else torch.tensor(bits)
        now = c.unit_now[self.unit]
        if type(value) is not int or type(now) is not int or now != value:
            set_precisions(self.layers, value)
            c.unit_now[self.unit] = value
        c.count(self.unit, ms, bits)
        c.overhead += time.perf_counter() - start

    def _tokens(self, x) -> None:
        """Teacher-forced: every position of x [B, T, in] by the rule of its bucket."""
        c = self.controller
        ms = estimate.input_ms(x).double()
        bits = torch.empty(ms.shape, dtype=torch.long)
        for k, (edges, values) in enumerate(self.rules):
            here = c.token_buckets == k
            bits[here] = torch.tensor(values)[torch.bucketize(ms[here], torch.tensor(edges, dtype=ms.dtype), right=True)]
        bits[:, 0] = c.plan.prefill
        set_precisions(self.layers, bits)
        c.token_bits[self.unit] = bits
