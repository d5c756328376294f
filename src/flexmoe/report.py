"""Human-readable summaries of results."""

from __future__ import annotations


def results_table(results: dict) -> str:
    """A per-client table of one run's results, with totals."""
    header = f"{'client':>6}  {'categories':<40} {'train':>6} {'test':>5} {'ROUGE-L':>8}"
    lines = [
        f"method {results['method']}, split {results['split']}, seed {results['seed']}, "
        f"{results['rounds']} rounds",
        header,
        "-" * len(header),
    ]
    for client in results["clients"]:
        categories = ", ".join(client["categories"])[:40]
        lines.append(
            f"{client['client_id']:>6}  {categories:<40} {client['n_train']:>6} "
            f"{client['n_test']:>5} {client['rouge_l']:>8.2f}"
        )
    comm = results["comm"]
    lines += [
        "-" * len(header),
        f"mean ROUGE-L {results['mean_rouge_l']:.2f}   uplink {_megabytes(comm['bytes_up'])}   "
        f"downlink {_megabytes(comm['bytes_down'])}   wall {results['wall_s']:.0f} s",
    ]
    return "\n".join(lines)


def _megabytes(count: int) -> str:
    return f"{count / 1e6:.2f} MB"
