"""What an export is asked for (`ExportOptions`), checked before anything is loaded and resolved for the model's
family once it is. Torch-free: the options exist before the export extra is needed."""
from __future__ import annotations

from dataclasses import dataclass, replace

from nxc import names
from nxc.export.outdir import ExportError

PRECISIONS = ("fp32", "fp16", "int8", "int4")


@dataclass(frozen=True)
class ExportOptions:
    precision: str = "fp32"
    max_context: int | None = None     # default: the model's max_position_embeddings, capped at 4096
    opset: int = 17
    graphs: tuple[str, ...] = ()        # default: every graph of the model's family (names.family_graphs)
    parity: bool = True
    # int8 / int4 (nxc.calib): calibration of vision and sam_encoder (nxc.export.quantized.calibrated_graphs);
    # loc_heads' accuracy report uses the same images when the torch LLaMA exists (export_model)
    calib_images: str | None = None    # folder; None: generated shapes scenes (embedded model only)
    calib_prompts: str | None = None   # file, one prompt per line
    calib_method: str = "minmax"
    calib_samples: int = 32
    recalibrate: bool = False          # ignore ranges cached in <out>/calib
    float_graphs: tuple[str, ...] = ()  # int8 / int4: encoders kept float32 (not calibrated), e.g. ("sam_encoder",)
    modules: str | None = None         # a module-call table file (nxc.export.modules; VITRON-style builds)
    block_size: int = 32               # int8 / int4 llm: MatMulNBits blocks along K (one float32 scale a block)

    @property
    def graph_precision(self) -> str:
        """Precision the graphs are exported in before any quantization."""
        return "fp16" if self.precision == "fp16" else "fp32"

    def precision_of(self, graph: str) -> str:
        """A graph's export precision: the retrieval family's small per-image graphs stay float32 in every build
        (a top-k over near-equal fp16 scores and RoI-align in fp16 would change which boxes come out)."""
        return "fp32" if graph in FLOAT32_GRAPHS else self.graph_precision


BLOCK_SIZES = (16, 32, 64, 128, 256)          # MatMulNBits' block_size: a power of two >= 16

# graphs kept float32 at every precision (a few hundred thousand weights; see ExportOptions.precision_of)
FLOAT32_GRAPHS = (names.GRAPH_PROPOSALS, names.GRAPH_OBJECT_FEATURES)


def check_options(options: ExportOptions) -> None:
    """Refuse a precision or graph name nxc-export does not know (before anything is loaded)."""
    if options.precision not in PRECISIONS:
        raise ExportError(f"precision {options.precision!r} is not available; choose one of {PRECISIONS}")
    if options.block_size not in BLOCK_SIZES:
        raise ExportError(f"--block-size {options.block_size}: MatMulNBits takes {', '.join(map(str, BLOCK_SIZES))}")
    if options.modules is not None:
        from nxc.export.modules import read_modules
        read_modules(options.modules)
    unknown = [g for g in options.graphs if g not in names.EXPORT_GRAPHS]
    if unknown:
        raise ExportError(f"unknown graph {unknown[0]!r}; the graphs are {', '.join(names.EXPORT_GRAPHS)}")


def family_options(config, options: ExportOptions) -> ExportOptions:
    """`options` with its graphs resolved for the model's family: all of them by default; refused when a graph
    named belongs to the other family."""
    own = names.family_graphs(config.grounding)
    if not options.graphs:
        return replace(options, graphs=own)
    other = [g for g in options.graphs if g not in own]
    if other:
        raise ExportError(f"graph {other[0]!r} is not part of a {config.grounding} model; its graphs are "
                          f"{', '.join(own)}")
    drawing = [g for g in names.DRAWING_GRAPHS if g in options.graphs]
    if drawing and len(drawing) < len(names.DRAWING_GRAPHS):
        raise ExportError(f"--graphs {' '.join(drawing)}: the drawing graphs {', '.join(names.DRAWING_GRAPHS)} are "
                          "exported together (the signal head needs all three); name all of them or none")
    return options
