"""The measured pipeline, once: scan → choose → drop → analyse → fuse → heal → evaluate → plan.

    pipe = Pipeline(model, windows, Settings(target_stages=20))
    costs = pipe.scan()                         # perplexity ratio of removing each attention
    layers = pipe.choose(costs)                 # the cheapest together, for the target depth
    result = pipe.run(layers)                   # removal, dependency, runs, healing, scores
    plans.save(result.plan, "plan.json")        # and `graphfuse apply` rebuilds it anywhere

The model is one in-memory ONNX model (a logits export or an onnxruntime-genai decoder, fp32 or
int4): every session comes from one factory (`Sessions`, CPU provider asserted), and a session
lives only as long as its model is needed. The caller passes token windows (`Windows`): the
pipeline never tokenises and never imports a model recipe.

Healing (the default, ``heal="ffn"``): each fused run's down projection is refitted by ridge
least squares to reproduce the *original* model's run output, attention included, so the fit
repairs the attention removal as well as the fusion (graphfuse.repair). The fit's strength is
then chosen on validation perplexity, not on activation error (which misleads: SmolLM2's run
10-12 taught that): the plain join (α = 0), the refit (α = 1) and halfway between (shrinkage
toward the plain join) are scored on the validation windows, and the lowest wins. With
``heal="linear"`` the down projections also read the normalised run input (H more columns, zero
in the plain join), so the fit learns a linear stand-in for the removed attention as well; such
a plan is not expressible as nemotron-nas.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
from tqdm import tqdm

from graphfuse import plan as plans
from graphfuse.errors import GraphfuseError

SHRINKAGE = (0.0, 0.5, 1.0)  # α: W = W_join + α (W_fit − W_join), chosen on validation


@dataclass(frozen=True)
class Windows:
    """Token windows, int64 [n, seq]: fit, choose, and judge on disjoint text."""

    calibration: np.ndarray  # the fits
    validation: np.ndarray  # λ and α choices (other sources)
    in_domain: np.ndarray  # calibration-like text the fits never saw
    test: np.ndarray  # one source nothing else touches: the headline figures


@dataclass
class Settings:
    target_stages: int = 20
    heal: str = "ffn"  # "none": plain join; "ffn": refit the down projections; "linear": also
    # over the normalised run input (a linear stand-in for attention; not nemotron-nas servable)
    # what a heal refits to: the original model's run output ("original": heals the attention
    # removal too) or the attention-removed model's sequential run ("input": repairs fusion only)
    heal_target: str = "original"
    gate_up: str = "exact"  # quantised gate/up: "exact" (per branch) or "requantized"
    scan_windows: int = 1  # calibration windows the importance scan reads
    scan_tokens: int = 512  # … cut to this many tokens (the re-rank reads one more window)
    dependency_windows: int = 1
    max_run: int | None = 3  # longest fused run: error grows with run length
    rerank: bool = True  # choose removals greedily together (see Pipeline.choose)
    threads: int | None = None
    progress: bool = True


class Sessions:
    """CPU sessions of in-memory models (no temporary files) at one thread count, from the one
    session factory, `graphfuse.evaluate.make_session` (provider checked, no memory arena)."""

    def __init__(self, threads: int | None = None) -> None:
        self.threads = threads

    def __call__(self, model: onnx.ModelProto) -> ort.InferenceSession:
        from graphfuse.evaluate import make_session

        return make_session(model, threads=self.threads)


@dataclass
class Score:
    perplexity: float
    agreement: float  # top-1 agreement with the original


@dataclass
class Result:
    plan: plans.Plan
    runs: list[tuple[int, int]]
    scores: dict[str, dict[str, Score]]  # model → text set → score
    stages: dict[str, int]
    repairs: list[dict] = field(default_factory=list)
    choice: dict[str, float] = field(default_factory=dict)  # α → validation perplexity
    dependency: Any = None
    seconds: dict[str, float] = field(default_factory=dict)
    models: dict[str, onnx.ModelProto] = field(default_factory=dict, repr=False)

    def as_dict(self) -> dict:
        return {
            "plan": self.plan.as_dict(),
            "runs": [f"{a}-{b}" for a, b in self.runs],
            "scores": {m: {t: asdict(s) for t, s in by.items()} for m, by in self.scores.items()},
            "stages": self.stages,
            "repairs": self.repairs,
            "validation_perplexity_by_alpha": self.choice,
            "seconds": self.seconds,
        }


def runs_from_layers(layers: list[int], max_run: int | None = None) -> list[tuple[int, int]]:
    """Removing the attention of layers c..c+m-1 joins FFN blocks c-1..c+m-1 into one run;
    runs longer than ``max_run`` are cut into pieces (each piece of one block is left alone)."""
    runs: list[tuple[int, int]] = []
    for layer in sorted(layers):
        if runs and runs[-1][1] == layer - 1:
            runs[-1] = (runs[-1][0], layer)
        else:
            runs.append((layer - 1, layer))
    if max_run is None:
        return runs
    pieces = []
    for a, b in runs:
        for start in range(a, b + 1, max_run):
            end = min(start + max_run - 1, b)
            if end > start:
                pieces.append((start, end))
    return pieces


class Pipeline:
    def __init__(
        self,
        model: onnx.ModelProto,
        windows: Windows,
        settings: Settings,
        dims: dict[str, int] | None = None,
        reference: onnx.ModelProto | None = None,
    ) -> None:
        """``dims``: sizes of symbolic input dimensions (an onnxruntime-genai decoder's cache
        head size: `graphfuse.genai.dims`). ``reference``: the model whose run outputs a heal
        fits (``heal_target="original"``) when ``model`` is not it, e.g. ``model`` had its
        attention removed already (default: ``model``)."""
        import graphfuse
        from graphfuse import evaluate

        self.model, self.windows, self.settings = model, windows, settings
        self.reference = model if reference is None else reference
        self._fit_feeds: tuple[list[dict], list[dict]] | None = None  # the fits' feeds, made once
        self.dims = dims or {}
        self.sessions = Sessions(settings.threads)
        self.found = graphfuse.inspect(model)
        if not self.found.blocks:
            raise GraphfuseError(
                "no FFN blocks found: the pipeline needs a model graphfuse recognises"
            )
        self.layers = len(self.found.blocks)
        self.seconds: dict[str, float] = {}
        self._inputs = evaluate.Inputs(model)  # feeds need the inputs, not a session
        self._top1: dict[str, np.ndarray] = {}  # the original's: agreement is measured against it
        self._gated: tuple[ort.InferenceSession, dict[int, str]] | None = None  # scan session
        self.rerank: list[tuple[int, float]] = []  # (layer taken, perplexity with it) in order

    @contextmanager
    def _timed(self, step: str) -> Iterator[None]:
        start = time.perf_counter()
        yield
        self.seconds[step] = round(self.seconds.get(step, 0) + time.perf_counter() - start, 1)
        _trim()

    def feeds(self, ids: np.ndarray) -> dict:
        from graphfuse.evaluate import prefill_feeds

        return prefill_feeds(self._inputs, ids, dims=self.dims)

    def _batches(self, windows: np.ndarray, batch: int = 2) -> list[dict]:
        return [self.feeds(windows[i : i + batch]) for i in range(0, len(windows), batch)]

    # -- scan and choose ---------------------------------------------------------------------

    def scan(self) -> dict[int, float]:
        """Perplexity ratio (without / with) of removing each layer's attention alone, from
        one session whose attention outputs are gated by scalar inputs."""
        s = self.settings
        with self._timed("scan"):
            ids = self.windows.calibration[: s.scan_windows, : s.scan_tokens]
            base = self._gated_perplexity(ids, [])
            costs = {}
            # Layer 0's attention comes before the first FFN block: removing it joins none.
            layers = [j for j in self._gates() if j > 0]
            for layer in tqdm(layers, desc="importance scan", unit="layer",
                              disable=not s.progress):  # fmt: skip
                costs[layer] = self._gated_perplexity(ids, [layer]) / base
        return costs

    def choose(self, costs: dict[int, float]) -> list[int]:
        """The layers to remove for ``target_stages`` (each removed attention layer fused with
        its neighbour saves one FFN stage).

        Removals interact: the layers cheapest alone are not the cheapest set. So with
        ``rerank`` (the default) the layers are taken one at a time, each the one whose removal
        *together with those already taken* costs least, from a shortlist of the cheapest alone,
        on a calibration window the single-layer scan did not read."""
        s = self.settings
        wanted = self.layers - s.target_stages
        if wanted <= 0:
            return []
        if wanted > len(costs):
            raise GraphfuseError(
                f"--target-stages {s.target_stages} needs {wanted} attention layers "
                f"removed, but only {len(costs)} can be"
            )
        order = sorted(costs, key=costs.__getitem__)

        def saved(layers: list[int]) -> int:  # long runs cut into pieces save fewer stages
            return sum(b - a for a, b in runs_from_layers(layers, s.max_run))

        if not s.rerank:
            chosen: list[int] = []
            for layer in order:
                if saved(chosen) >= wanted:
                    break
                chosen.append(layer)
            return sorted(chosen)
        shortlist = order[: wanted + 2]
        ids = self.windows.calibration[s.scan_windows : s.scan_windows + 1, : s.scan_tokens]
        chosen, self.rerank = [], []
        with self._timed("rerank"), tqdm(total=wanted, desc="re-rank removals", unit="layer",
                                         disable=not s.progress) as bar:  # fmt: skip
            while saved(chosen) < wanted and len(chosen) < len(shortlist):
                # only removals that save a stage (27 beside 25-26 would lengthen run 24-26
                # into 24-27, which max_run cuts back: attention lost for nothing)
                trials = {j: self._gated_perplexity(ids, [*chosen, j]) for j in shortlist
                          if j not in chosen and saved([*chosen, j]) > saved(chosen)}  # fmt: skip
                if not trials:
                    break
                best = min(trials, key=trials.__getitem__)
                chosen.append(best)
                self.rerank.append((best, trials[best]))
                bar.update()
        for layer in order:  # a shortlist that falls short: the next cheapest alone
            if saved(chosen) >= wanted:
                break
            if layer not in chosen:
                chosen.append(layer)
        self._gated = None  # the scan's session is not needed any more
        return sorted(chosen)

    def _gates(self) -> dict[int, str]:
        from graphfuse.passes.drop_attention import gate_attention

        if self._gated is None:
            gated, gates = gate_attention(self.model)
            self._gated = (self.sessions(gated), gates)
        return self._gated[1]

    def _gated_perplexity(self, ids: np.ndarray, off: list[int]) -> float:
        """Perplexity with the attention of ``off`` removed (gated to zero)."""
        from graphfuse import evaluate

        gates = self._gates()
        assert self._gated is not None
        feeds = {g: np.array(0 if j in off else 1, np.float32) for j, g in gates.items()}
        return evaluate.perplexity(self._gated[0], ids, extra=feeds, progress=False,
                                   dims=self.dims)  # fmt: skip

    # -- the rest ------------------------------------------------------------------------------

    def run(self, layers: list[int], *, analyse: bool = True, only_final: bool = False) -> Result:
        """Remove the attention of ``layers``, fuse the runs that makes, heal, and score
        (``only_final``: the final model alone, against the original's top-1)."""
        from graphfuse.analysis import dependency_matrix
        from graphfuse.passes.drop_attention import drop_attention

        s = self.settings
        with self._timed("drop"):
            removed, _ = drop_attention(self.model, layers)
        runs = runs_from_layers(layers, s.max_run)
        dependency = None
        if runs and analyse:
            with self._timed("analyse"):
                blocks = sorted({i for a, b in runs for i in range(a, b + 1)})
                batches = [
                    self.feeds(w[None]) for w in self.windows.calibration[: s.dependency_windows]
                ]
                dependency = dependency_matrix(removed, batches, blocks=blocks,
                                               threads=s.threads, progress=s.progress)  # fmt: skip
        healed, repairs, weights, choice = self.fuse_and_heal(removed, runs)
        with self._timed("evaluate"):
            models = {"original": self.model, "attention removed": removed, "final": healed}
            if only_final:
                models = {"final": healed}
            scores = {name: self.score(m) for name, m in models.items()}
        plan = self.plan(layers, runs, repairs, weights, choice)
        stages = self.layers - sum(b - a for a, b in runs)
        return Result(
            plan, runs, scores, {"original": self.layers, "attention removed": self.layers,
                                 "final": stages},
            repairs, choice, dependency, dict(self.seconds), models,
        )  # fmt: skip

    def fuse_and_heal(self, model: onnx.ModelProto, runs: list[tuple[int, int]],
                      cache: dict | None = None):  # fmt: skip
        """Fuse ``runs`` of ``model`` and heal them as the settings say: (the model, the repairs,
        the refitted weights by run, validation perplexity by α). ``cache``: repair fits already
        made on ``model`` with these settings and windows (`select`'s)."""
        import graphfuse

        s = self.settings
        with self._timed("fuse"):
            linear = runs if s.heal == "linear" else []
            fused, _ = graphfuse.fuse(model, runs, requantize=self._requantize, linear=linear)
        if not runs or s.heal not in ("ffn", "linear"):
            return fused, [], {}, {}
        healed, repairs, weights, choice = self._heal(model, fused, runs, cache)
        if linear and not weights:  # the plain join won (α = 0): ship it without n̂, as its plan
            healed, _ = graphfuse.fuse(model, runs, requantize=self._requantize)
        return healed, repairs, weights, choice

    def select(
        self,
        candidates: list[tuple[int, int]],
        *,
        target_stages: int | None = None,
        max_increase: float | None = 0.1,
        keep_last: bool = False,
        max_length: int | None = None,
    ):
        """The paper's greedy selection (`graphfuse.selection`) over ``candidates`` (runs of the
        model, which has its attention removed already), from the dependency matrix on the
        calibration windows; each set of runs is checked on validation perplexity of the model
        fused with them, and healed first when the settings heal. Returns the selection; its
        repair fits stay in ``self.fits`` for `fuse_and_heal`."""
        import graphfuse
        from graphfuse import evaluate
        from graphfuse.analysis import dependency_matrix
        from graphfuse.selection import select_runs

        s = self.settings
        blocks = sorted({i for a, b in candidates for i in range(a, b + 1)})
        with self._timed("analyse"):
            batches = [
                self.feeds(w[None]) for w in self.windows.calibration[: s.dependency_windows]
            ]
            dependency = dependency_matrix(self.model, batches, blocks=blocks, threads=s.threads,
                                           progress=s.progress)  # fmt: skip
        seen: dict[tuple, float] = {}  # a union of runs can be reached from several candidates
        self.fits: dict = {}  # a run's fit does not depend on the other runs

        def check(runs: list[tuple[int, int]]) -> float:
            if tuple(runs) in seen:
                return seen[tuple(runs)]
            model = self.model
            if runs and s.heal in ("ffn", "linear"):  # judged as they will ship: healed
                model, _ = self._repair(self.model, runs, self.fits, progress=False)
            elif runs:
                model, _ = graphfuse.fuse(self.model, runs, requantize=self._requantize)
            seen[tuple(runs)] = evaluate.perplexity(self.sessions(model), self.windows.validation,
                                                    progress=False, dims=self.dims)  # fmt: skip
            return seen[tuple(runs)]

        with self._timed("select"):
            return select_runs(dependency, candidates, n_blocks=self.layers,
                               target_stages=target_stages, max_increase=max_increase,
                               check=check, keep_last=keep_last, max_length=max_length)  # fmt: skip

    def curve(self, order: list[int], stages: list[int]) -> list[dict]:
        """The depth/quality curve: for each FFN-stage count, the removals taken in ``order``
        (the re-rank's, then the scan's) until it is met, fused and healed as `run` does,
        scored on the in-domain and test text."""
        points = []
        for target in tqdm(stages, desc="depth/quality curve", unit="point",
                           disable=not self.settings.progress):  # fmt: skip
            need = self.layers - target
            layers: list[int] = []
            for layer in order:
                runs = runs_from_layers(layers, self.settings.max_run)
                if sum(last - first for first, last in runs) >= need:
                    break
                layers.append(layer)
            result = self.run(sorted(layers), analyse=False, only_final=True)
            final = result.scores["final"]
            points.append({
                "stages": result.stages["final"], "layers": sorted(layers),
                **{f"{part}_perplexity": score.perplexity for part, score in final.items()},
                **{f"{part}_agreement": score.agreement for part, score in final.items()},
            })  # fmt: skip
            del result
        return points

    def _repair(self, model: onnx.ModelProto, runs: list[tuple[int, int]], cache: dict,
                progress: bool):  # fmt: skip
        """`repair_runs` as the settings say (target, gate/up form, linear stand-in), on the
        calibration and validation windows' feeds (made once)."""
        from graphfuse.repair import repair_runs

        s = self.settings
        if self._fit_feeds is None:
            self._fit_feeds = (self._batches(self.windows.calibration),
                               self._batches(self.windows.validation))  # fmt: skip
        return repair_runs(
            model, runs, *self._fit_feeds, threads=s.threads, progress=progress, cache=cache,
            reference=self.reference if s.heal_target == "original" else None,
            requantize=self._requantize, linear=s.heal == "linear",
        )  # fmt: skip

    def _heal(self, removed, fused, runs, cache: dict | None = None):
        from graphfuse import evaluate
        from graphfuse.repair import set_down_weight

        cache = {} if cache is None else cache
        with self._timed("heal"):
            _, repairs = self._repair(removed, runs, cache, progress=self.settings.progress)
            joins = {run: _down_weight(fused, *run) for run in runs}
        choice, best = {}, None
        with self._timed("choose"):
            for alpha in SHRINKAGE:
                model = _copy(fused)
                for a, b in runs:
                    if alpha:
                        w = joins[a, b] + alpha * (cache[a, b][0] - joins[a, b])
                        set_down_weight(model, a, b, w.astype(np.float32))
                ppl = evaluate.perplexity(self.sessions(model), self.windows.validation,
                                          progress=False, dims=self.dims)  # fmt: skip
                choice[f"{alpha:g}"] = ppl
                if best is None or ppl < best[0]:
                    best = (ppl, alpha, model)
                del model
        assert best is not None
        _, alpha, healed = best
        weights = {
            run: (joins[run] + alpha * (cache[run][0] - joins[run])).astype(np.float32)
            for run in runs
        }
        records = [{**asdict(r), "alpha": alpha} for r in repairs]
        return healed, records, weights if alpha else {}, choice

    def score(self, model: onnx.ModelProto) -> dict[str, Score]:
        """Perplexity and top-1 agreement with the original on the in-domain and test text (the
        original's own score first: it is the reference)."""
        from graphfuse import evaluate

        if model is not self.model and not self._top1:
            self.score(self.model)
        session = self.sessions(model)
        out = {}
        for part in ("in_domain", "test"):
            ids = getattr(self.windows, part)
            result = evaluate.score(session, ids, reference_top1=self._top1.get(part),
                                    progress=self.settings.progress, dims=self.dims)  # fmt: skip
            if model is self.model:
                self._top1[part] = result.top1
            out[part] = Score(
                result.perplexity, 1.0 if result.agreement is None else result.agreement
            )
        return out

    @property
    def _requantize(self) -> bool:
        return self.settings.gate_up == "requantized"

    def plan(self, layers, runs, repairs, weights, choice) -> plans.Plan:
        """The plan of removing the attention of ``layers`` and fusing and healing ``runs`` (what
        `fuse_and_heal` returned)."""
        plan = plans.Plan(
            plans.source_of(self.found), sorted(layers), gate_up=self.settings.gate_up
        )
        by_run = {r["run"]: r for r in repairs}
        for a, b in runs:
            healed = (a, b) in weights
            repair = by_run.get(f"{a}-{b}", {})
            run = plans.RunPlan(a, b, self.settings.heal if healed else "none",
                                self.settings.heal_target if healed else None,
                                repair.get("lam"))  # fmt: skip
            plan.runs.append(run)
            if healed:
                plan.weights[run.key] = weights[(a, b)]
        if choice:
            plan.notes["validation_perplexity_by_alpha"] = choice
        return plan


def _copy(model: onnx.ModelProto) -> onnx.ModelProto:
    out = onnx.ModelProto()
    out.CopyFrom(model)
    return out


def _down_weight(model: onnx.ModelProto, a: int, b: int) -> np.ndarray:
    """The fused run's down projection as float32 [ΣI, H], dequantised when quantised."""
    from graphfuse.repair import down_weight

    return down_weight(model, a, b)


def _trim() -> None:
    """Give freed memory back to the system (glibc keeps it otherwise): each step's sessions
    and arrays are gone when the next one starts, and the peak should say so."""
    import ctypes
    import gc

    gc.collect()
    with suppress(OSError, AttributeError):  # not glibc: nothing to do
        ctypes.CDLL("libc.so.6").malloc_trim(0)
