"""python -m mindflux.check_device [--device auto|ascend|gpu|cpu] [--json FILE] [--msrun 2] [--stages a,b]"""

from __future__ import annotations

import argparse
import sys

from . import STAGES, DeviceUnavailable, format_table, run_stages, write_json


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m mindflux.check_device",
                                description="Check mindflux on this machine's device: versions, op parity against "
                                            "a CPU fp32 reference, a FLUX-width forward, a LoRA train step, "
                                            "generation with the demo model, and (with --msrun) data parallelism. "
                                            "Attach the --json report to bug reports.")
    p.add_argument("--device", default="auto", choices=["auto", "ascend", "gpu", "cpu"],
                   help="the device to check (default auto: Ascend, then GPU, then the CPU)")
    p.add_argument("--json", metavar="FILE", help="also write the report as JSON to FILE")
    p.add_argument("--msrun", type=int, default=0, metavar="N",
                   help="run the N-worker msrun data-parallel equality check (N = 2; needs N devices)")
    p.add_argument("--stages", help=f"comma-separated subset of the stages, in order (default all: "
                                    f"{','.join(STAGES)})")
    p.add_argument("--_events", help=argparse.SUPPRESS)  # worker mode: the runner's event file
    p.add_argument("--_workdir", help=argparse.SUPPRESS)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    names = list(STAGES) if not args.stages else [s.strip() for s in args.stages.split(",") if s.strip()]
    unknown = [n for n in names if n not in STAGES]
    if unknown:
        parser.error(f"--stages: unknown stage(s) {', '.join(unknown)}; the stages are {', '.join(STAGES)}")
    if args.msrun not in (0, 2):
        parser.error(f"--msrun {args.msrun}: only 2 workers are checked (--msrun 2)")
    if args._events:
        from .stages import work

        work(args.device, names, args.msrun, args._events, args._workdir)
        return 0
    print(f"mindflux device check ({args.device}); stages: {', '.join(names)}", flush=True)

    def echo(result):
        print(f"  {result.name}: {result.status} ({result.seconds:.1f} s) {result.detail}", flush=True)

    try:
        info, results = run_stages(args.device, names, args.msrun, echo=echo)
    except DeviceUnavailable as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"\ndevice: {info['device']}")
    for key, value in info.get("versions", {}).items():
        print(f"  {key}: {value}")
    print(format_table(results))
    if args.json:
        write_json(args.json, info, results)
        print(f"report written to {args.json}")
    failed = [r.name for r in results if r.status == "fail"]
    print(f"{len(failed)} stage(s) failed: {', '.join(failed)}" if failed else "no stage failed", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
