"""Write a DeepSpeed hostfile from the alive nodes of a running Ray cluster.

    python cluster/make_hostfile.py [--address auto] [--out cluster/hostfile] [--slots N] [--cpu]

One line per alive node, ``<node IP> slots=<GPUs on the node>`` (``--slots`` forces a number; ``--cpu`` counts CPU
processes, one per node unless ``--slots``). The head node is listed first, so it is DeepSpeed's rank-0 node and the
natural ``--master_addr``. Nodes without GPUs are skipped unless ``--cpu``.
"""

from __future__ import annotations

import argparse
import os
import sys


def hostfile_lines(nodes: list[dict], slots: int | None = None, cpu: bool = False) -> list[str]:
    """Hostfile lines from ``ray.nodes()`` entries (pure: unit-testable without a cluster)."""
    alive = [n for n in nodes if n.get("Alive")]
    # The head node carries the "node:__internal_head__" resource; put it first.
    alive.sort(key=lambda n: (0 if "node:__internal_head__" in n.get("Resources", {}) else 1,
                              n.get("NodeManagerAddress", "")))
    lines = []
    for n in alive:
        gpus = int(n.get("Resources", {}).get("GPU", 0))
        count = slots if slots is not None else (gpus if gpus else (1 if cpu else 0))
        if count > 0:
            lines.append(f"{n['NodeManagerAddress']} slots={count}")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("--address", default=os.environ.get("RAY_ADDRESS", "auto"), help="Ray cluster address")
    parser.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "hostfile"))
    parser.add_argument("--slots", type=int, default=None, help="processes per node (default: its GPUs)")
    parser.add_argument("--cpu", action="store_true", help="include nodes without GPUs (one CPU process each)")
    args = parser.parse_args()

    import ray

    ray.init(address=args.address, log_to_driver=False, configure_logging=False)
    try:
        lines = hostfile_lines(ray.nodes(), args.slots, args.cpu)
    finally:
        ray.shutdown()
    if not lines:
        print("error: no alive node with GPUs in the Ray cluster (use --cpu or --slots)", file=sys.stderr)
        raise SystemExit(1)
    with open(args.out, "w") as fh:
        fh.write("\n".join(lines) + "\n")
    print(f"wrote {args.out}:\n" + "\n".join(lines))


if __name__ == "__main__":
    main()
