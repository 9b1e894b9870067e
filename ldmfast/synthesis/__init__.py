"""ldmfast.synthesis: batch synthesis of DWI/ADC volumes from the CTP of many cases
(`ldmfast synthesize`), slices batched across volumes, cases sharded across torchrun processes."""
from .batching import Batch, CaseJob, SliceBatcher, scatter
from .cases import SynthesisCase, prepare_case
from .config import SCALES, SynthesisConfig, load_synthesis_config
from .outputs import RECORD_NAME, case_complete, sample_paths, write_case
from .runner import SynthesisSummary, synthesize
from .seeds import slice_seed

__all__ = [
    "RECORD_NAME", "SCALES", "Batch", "CaseJob", "SliceBatcher", "SynthesisCase", "SynthesisConfig",
    "SynthesisSummary", "case_complete", "load_synthesis_config", "prepare_case", "sample_paths", "scatter",
    "slice_seed", "synthesize", "write_case",
]
