"""The `ldmfast` command line."""
from __future__ import annotations

import argparse
import platform
import sys

from . import __version__


def _cmd_info(args: argparse.Namespace) -> int:
    import torch

    import ldmfast
    from ldmfast.ops import _backends, _native

    lines = [f"ldmfast  {ldmfast.__version__}", f"python   {platform.python_version()}",
             f"torch    {torch.__version__} (built with CUDA {torch.version.cuda or 'none'})"]
    try:
        import triton
        lines.append(f"triton   {triton.__version__}" + (" (interpreter: TRITON_INTERPRET=1)"
                                                         if _backends._TRITON_INTERPRET else ""))
    except ImportError:
        lines.append("triton   not installed")
    cuda_mod = _native.cuda_module()
    if cuda_mod is None:
        lines.append("ldmfast CUDA module: not built")
    else:
        info = cuda_mod.build_info()
        rt, drv = info["cuda_runtime"], info["cuda_driver"]
        lines.append(f"ldmfast CUDA module: architectures {info['architectures']}, runtime "
                     f"{rt // 1000}.{rt % 1000 // 10}, driver " + (f"{drv // 1000}.{drv % 1000 // 10}" if drv > 0 else "none"))
    devices = [torch.device("cpu")]
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            p = torch.cuda.get_device_properties(i)
            lines.append(f"GPU {i}    {p.name}, compute capability {p.major}.{p.minor}, {p.total_memory / 2**30:.1f} GiB")
        devices.append(torch.device("cuda"))
    else:
        lines.append("GPU      none visible to torch")
    forced, source = _backends._forced()
    try:
        _backends._check_choice(forced, source)
    except ValueError as err:  # every op call would raise it: said here, and the exit status says so
        lines.append(f"forced backend: error: {err}")
        print("\n".join(lines))
        return 2
    lines.append(f"forced backend: {forced} (LDMFAST_BACKEND / ldmfast.ops.use_backend)")
    print("\n".join(lines))
    for device in devices:
        print(f"\nbackends on {device.type} tensors:")
        table = _backends.availability(device)
        width = max(len(op) for op in table)
        for op, row in table.items():
            for backend, state in row.items():
                print(f"  {op:<{width}}  {backend:<9}  {state}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ldmfast", description="Fast lesion-aware latent diffusion: CT perfusion to DWI/ADC.",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"ldmfast {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    info = sub.add_parser("info", help="versions, GPU and the backends available for each op",
                          description="Print the ldmfast, torch, triton and CUDA versions, the compiled CUDA "
                                      "architectures, the GPU if any, and which backend each op can use.",
                          epilog="example:\n  ldmfast info", formatter_class=argparse.RawDescriptionHelpFormatter)
    info.set_defaults(func=_cmd_info)
    from ldmfast.data.cli import add_phantom_parser
    add_phantom_parser(sub)
    from ldmfast.metrics.cli import add_evaluate_parser
    add_evaluate_parser(sub)
    from ldmfast.train.cli import add_train_parser
    add_train_parser(sub)
    from ldmfast.demo_cli import add_demo_parser
    add_demo_parser(sub)
    from ldmfast.synthesis.cli import add_synthesize_parser
    add_synthesize_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
