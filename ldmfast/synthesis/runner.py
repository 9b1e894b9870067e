"""Batch synthesis: cases -> slice queue batched across volumes -> generate -> per-case assembly
-> atomic write, with a background reader and writer so the model is kept busy.

Under torchrun every process lists the same cases and takes every world_size-th one (each case
is written by one process); the summary is gathered so that every process returns the whole
run's (and the command exits the same way on all of them)."""
from __future__ import annotations

import sys
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import nibabel as nib
import numpy as np
import torch
from tqdm.auto import tqdm

import ldmfast
from ldmfast.data import CaseFiles, find_cases
from ldmfast.models.model_folder import folder_fingerprint
from ldmfast.train.config import ConfigError, unloadable_model
from ldmfast.train.distributed import DistInfo

from .batching import Batch, CaseJob, SliceBatcher, scatter
from .cases import SynthesisCase, prepare_case
from .config import (SynthesisConfig, check_against_model, check_output_overlap, check_paths, model_multiple,
                     read_intensity_stats, read_model_config)
from .outputs import case_complete, keep_first_samples, read_record, record_conflict, write_case
from .seeds import slice_seed


@dataclass
class SynthesisSummary:
    """What a run did: case ids written and skipped (already complete), failed ones with the
    reason, slices generated (x samples) and the wall time of the synthesis loop."""

    written: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)
    slices: int = 0
    seconds: float = 0.0

    @property
    def slices_per_second(self) -> float:
        return self.slices / self.seconds if self.seconds > 0 else 0.0

    @property
    def ok(self) -> bool:
        return not self.failed

    @classmethod
    def merge(cls, parts: list["SynthesisSummary"]) -> "SynthesisSummary":
        """One summary of several processes' (which ran at the same time)."""
        out = cls()
        for part in parts:
            out.written += part.written
            out.skipped += part.skipped
            out.failed.update(part.failed)
            out.slices += part.slices
            out.seconds = max(out.seconds, part.seconds)
        out.written.sort()
        out.skipped.sort()
        out.failed = dict(sorted(out.failed.items()))
        return out


def generate_options(config: SynthesisConfig, device: torch.device) -> dict:
    """Keyword arguments for ConditionalLDM.generate: DDIM settings, and on a GPU the sampler's
    speed options (bf16 autocast by default, channels-last, CUDA graphs)."""
    options = {"steps": config.steps, "eta": config.eta, "spacing": config.spacing}
    name = config.dtype if config.dtype != "auto" else ("bfloat16" if device.type == "cuda" else "float32")
    options["autocast"] = None if name == "float32" else getattr(torch, name)
    options["channels_last"] = device.type == "cuda"
    options["cuda_graph"] = config.cuda_graph if config.cuda_graph is not None else device.type == "cuda"
    if options["cuda_graph"] and device.type != "cuda":
        raise ConfigError("cuda_graph", f"CUDA graphs need a CUDA device, not {device}")
    return options


def run_settings(config: SynthesisConfig) -> dict:
    """The settings that decide a case's voxels, as its record keeps them: a rerun resumes only the
    cases these same settings made (not the device, dtype or batch size: those only round)."""
    fingerprint = folder_fingerprint(config.model)
    return {"model": str(Path(config.model).resolve()), "model_files": fingerprint["model_files"],
            "model_configs": fingerprint["configs"],
            "steps": config.steps, "eta": config.eta, "spacing": config.spacing, "seed": config.seed,
            "size": list(config.size) if config.size else None, "scale_option": config.scale}


def _describe(err: BaseException) -> str:
    text = str(err) or type(err).__name__
    return text if isinstance(err, ValueError) else f"{type(err).__name__}: {text}"


class _Run:
    """The state of one process's synthesis loop."""

    def __init__(self, config: SynthesisConfig, dist: DistInfo, model, bar: tqdm, log: Callable[[str], None],
                 settings: dict):
        self.config, self.dist, self.model, self.bar, self.log = config, dist, model, bar, log
        self.summary = SynthesisSummary()
        self.options = generate_options(config, dist.device)
        self.batcher = SliceBatcher(config.batch_size)
        self.writer = ThreadPoolExecutor(1, thread_name_prefix="ldmfast-write")
        self.writes: dict[str, Future] = {}
        self.record = {"ldmfast": ldmfast.__version__, **settings, "samples": config.samples,
                       "batch_size": config.batch_size}
        self.expected: dict[str, int] = {}  # slices x samples the progress bar counts on, by case

    def expect(self, cases: list[CaseFiles]) -> None:
        """Start the progress bar at what the cases' headers promise (every axial slice x samples),
        so that its percentage and time left cover the whole run from the start; a case's count
        is corrected once it is read (slices without usable CTP are not synthesized) or fails."""
        for files in cases:
            try:
                self.expected[files.case_id] = int(nib.load(files.ctp).shape[2]) * self.config.samples
            except Exception:  # a bad file: its case fails when it is read, and reports why
                self.expected[files.case_id] = 0
        self._retotal(sum(self.expected.values()))

    def _retotal(self, change: int) -> None:
        if change:
            self.bar.total = (self.bar.total or 0) + change
            self.bar.refresh()

    def fail(self, case_id: str, err: BaseException | str) -> None:
        reason = err if isinstance(err, str) else _describe(err)
        self.summary.failed[case_id] = reason
        self._retotal(-self.expected.pop(case_id, 0))
        self.log(f"case {case_id!r} failed and is skipped: {reason}")

    def fail_job(self, job: CaseJob, err: BaseException | str) -> None:
        if not job.failed:
            job.failed = True
            self.batcher.drop(job)
            self._retotal(-job.remaining)  # its slices not generated yet will not be
            self.fail(job.case_id, err)

    def add_case(self, case: SynthesisCase) -> None:
        seeds = np.array([[slice_seed(self.config.seed, case.case_id, int(i), k) for i in case.prepared.slice_index]
                          for k in range(self.config.samples)], dtype=np.int64)
        job = CaseJob(case.case_id, case.ctp, seeds, payload=case)
        self._retotal(job.items - self.expected.pop(case.case_id, 0))
        if case.prepared.source_frames != case.ctp.shape[1]:
            self.log(f"case {case.case_id!r}: its CTP has {case.prepared.source_frames} time frames, resampled in time "
                     f"to the model's {case.ctp.shape[1]}")
        if case.cropped_brain:
            self.log(f"case {case.case_id!r}: the slice size {case.ctp.shape[-2]} x {case.ctp.shape[-1]} (--size) "
                     f"crops {case.cropped_brain} brain voxels away; they are written as 0")
        for batch in self.batcher.add(job):
            self.run_batch(batch)

    def run_batch(self, batch: Batch) -> None:
        try:
            ctp = torch.from_numpy(batch.ctp).to(self.dist.device)
            images = self.model.generate(ctp, batch.seeds, **self.options).float().cpu().numpy()
        except Exception as err:  # the cases of this batch fail; the others go on
            for job, _, _ in batch.entries:
                self.fail_job(job, err)
            return
        finite = np.isfinite(images[:batch.real]).reshape(batch.real, -1).all(axis=1)
        for (job, _, _), ok in zip(batch.entries, finite):
            if not ok:
                self.fail_job(job, "the model produced non-finite values")
        self.summary.slices += batch.real
        self.bar.update(sum(not job.failed for job, _, _ in batch.entries))  # a failed case left the total
        for job in scatter(batch, images):
            self.writes[job.case_id] = self.writer.submit(write_case, self.config.output, job.payload, job.images,
                                                          self.record)
            job.images = None  # the writer holds them now
        self.collect_writes(wait=False)

    def collect_writes(self, wait: bool) -> None:
        for case_id, future in list(self.writes.items()):
            if wait or future.done():
                del self.writes[case_id]
                try:
                    future.result()
                except Exception as err:
                    self.fail(case_id, err)
                else:
                    self.summary.written.append(case_id)
                    self.bar.set_postfix(written=len(self.summary.written), failed=len(self.summary.failed),
                                         refresh=False)


def _prepared_cases(cases: list[CaseFiles], prepare: Callable[[CaseFiles], SynthesisCase], prefetch: int
                    ) -> Iterator[tuple[CaseFiles, SynthesisCase | Exception]]:
    """(files, prepared case or the error that stopped it), in order, read up to `prefetch`
    cases ahead in a background thread (NIfTI decoding overlaps the model's work)."""
    def attempt(files):
        try:
            return prepare(files)
        except Exception as err:  # reported per case by the caller
            return err

    if prefetch == 0:
        for files in cases:
            yield files, attempt(files)
        return
    with ThreadPoolExecutor(1, thread_name_prefix="ldmfast-read") as pool:
        pending: deque = deque()
        todo = iter(cases)
        try:
            for files in todo:
                pending.append((files, pool.submit(attempt, files)))
                if len(pending) > prefetch:
                    done_files, future = pending.popleft()
                    yield done_files, future.result()
            while pending:
                done_files, future = pending.popleft()
                yield done_files, future.result()
        finally:
            for _, future in pending:
                future.cancel()


def synthesize(config: SynthesisConfig, *, dist: DistInfo | None = None, progress: bool = True,
               log: Callable[[str], None] | None = None) -> SynthesisSummary:
    """Synthesize every case of `config.input` into `config.output` (see SynthesisConfig);
    returns the summary of the whole run (all processes under torchrun). Bad cases are
    reported through `log` and listed in the summary, never raised; a refused configuration
    raises ConfigError before any case is read."""
    from ldmfast.models import ConditionalLDM

    model_config = read_model_config(config.model)
    check_against_model(config, model_config)
    check_paths(config)
    if dist is None:
        device = torch.device(config.device if config.device != "auto" else
                              ("cuda" if torch.cuda.is_available() else "cpu"))
        dist = DistInfo(0, 1, 0, device)
    reference_stats = read_intensity_stats(config.model) if config.scale == "auto" else None
    if log is None:
        prefix = f"[rank {dist.rank}] " if dist.distributed else ""
        log = lambda message: tqdm.write(prefix + message, file=sys.stderr)  # noqa: E731

    listed = find_cases(config.input, layout=config.layout, skip_bad=True)
    check_output_overlap(config, listed)
    settings = run_settings(config)
    complete = set() if config.overwrite else completed_cases(config, settings, listed)
    mine = list(listed)[dist.rank::dist.world_size]
    try:
        model = ConditionalLDM.from_pretrained(config.model, dist.device).eval()
    except Exception as err:  # a damaged or mismatched model folder: the setting is wrong, not a case
        raise unloadable_model("model", f"{config.model}: cannot load the model", _describe(err)) from None
    # (delay: shown once the headers' total is in, not as "0 slices" first)
    bar = tqdm(total=0, unit=" slices", desc="synthesize", disable=not (progress and dist.is_main), dynamic_ncols=True,
               delay=0.5)
    run = _Run(config, dist, model, bar, log, settings)
    if dist.is_main:  # every process lists the same cases: report the unlistable ones once
        for err in listed.errors:
            run.fail(err.case or str(err.path), err)

    todo = []
    for files in mine:
        if files.case_id in complete:
            run.summary.skipped.append(files.case_id)
        else:
            todo.append(files)
    run.expect(todo)

    def prepare(files: CaseFiles) -> SynthesisCase:
        return prepare_case(files, frames=model.frames, multiple=model_multiple(model_config), size=config.size,
                            scale=config.scale, reference_stats=reference_stats)

    start = time.perf_counter()
    prefetch = config.prefetch if config.prefetch is not None else (2 if dist.device.type == "cuda" else 0)
    reader = _prepared_cases(todo, prepare, prefetch)
    try:
        for files, prepared in reader:
            if isinstance(prepared, Exception):
                run.fail(files.case_id, prepared)
            else:
                run.add_case(prepared)
        for batch in run.batcher.flush():
            run.run_batch(batch)
        run.collect_writes(wait=True)
    finally:
        # Interrupted: queued writes are dropped; one already running finishes (its files are
        # renamed into place whole and its record comes last), then the error propagates.
        reader.close()
        run.writer.shutdown(wait=True, cancel_futures=True)
    run.summary.seconds = time.perf_counter() - start
    bar.close()
    return gather_summary(run.summary, dist)


def completed_cases(config: SynthesisConfig, settings: dict, cases) -> set[str]:
    """The ids of the cases whose outputs this run's settings (run_settings) made and finished, to
    skip. Outputs that other settings made are refused (ConfigError on `output`) rather than kept or
    replaced: --overwrite replaces them. Every process reads every case's record, so all refuse
    together."""
    complete, conflicts = set(), {}
    for files in cases:
        record = read_record(config.output, files.case_id)
        if record is None:
            continue
        conflict = record_conflict(record, settings)
        if conflict:
            conflicts[files.case_id] = conflict
        elif case_complete(config.output, files.case_id, config.samples, record):
            complete.add(files.case_id)
            if record.get("samples", 1) > config.samples:  # kept, as a run of this count would have written it
                keep_first_samples(config.output, files.case_id, config.samples, record)
    if conflicts:
        case_id, conflict = next(iter(conflicts.items()))
        raise ConfigError("output", f"{config.output}: {len(conflicts)} case(s) there were synthesized with other "
                                    f"settings (case {case_id!r}: {conflict}); pass --overwrite to replace them, "
                                    "or choose another output folder")
    return complete


def gather_summary(summary: SynthesisSummary, dist: DistInfo) -> SynthesisSummary:
    """The whole run's summary on every process."""
    if not dist.distributed:
        return summary
    import torch.distributed as tdist

    parts: list = [None] * dist.world_size
    tdist.all_gather_object(parts, summary)
    return SynthesisSummary.merge(parts)
