"""The customization benchmark's tables as markdown (for the report and the CLI)."""

from __future__ import annotations


def format_abc(summary: dict) -> str:
    """The benchmark's table (held-out concepts) and the calibration table, as markdown."""
    ks = sorted(int(k.split("@")[1]) for k in summary["chance"] if k.startswith("recall@"))
    head = "| method | kind | queries | " + " | ".join(f"R@{k}" for k in ks) + " | mAP |"
    lines = [f"Pool: {summary['pool']} items (training set ∪ all exemplars), "
             f"{summary['exemplars_per_concept']} exemplars per concept; "
             f"{summary['concepts']['train']} training concepts (of which "
             f"{summary['concepts'].get('calibration', 0)} fit the calibrators and are kept from "
             f"the mappers) / {summary['concepts']['test']} held-out concepts; "
             f"{summary['test_queries']} held-out synthesized images.", "",
             head, "|" + "---|" * (4 + len(ks))]
    ch = summary["chance"]
    lines.append("| chance | any | | " + " | ".join(f"{ch[f'recall@{k}']:.3f}" for k in ks)
                 + f" | {ch['mAP']:.3f} |")
    for method, res in summary["methods"].items():
        for kind, r in res.items():
            lines.append(f"| {method} | {kind} | {r['queries']} | "
                         + " | ".join(f"{r[f'recall@{k}']:.3f}" for k in ks)
                         + f" | {r['mAP']:.3f} ± {r['mAP_stderr']:.3f} |")
    lines += ["", "Methods that read text (text spaces, concatenations with one, the student, the "
              "teacher through its prompt conditioning) see the concept's made-up word in the "
              "synthesized image's prompt and in its exemplars' captions; image-only spaces "
              "(pixels, *_image) must find the exemplars from pixels alone."]
    lines += ["", "Soft attribution on held-out concepts (fit on the calibration concepts): NLL of the "
              "true exemplars (lower is better), probability mass on them (ideal 1), ECE of the "
              "top-10 shares.", "",
              "| method | calibration | τ | offset b | NLL | exemplar mass | ECE@10 |",
              "|---|---|---|---|---|---|---|"]
    for method, rows in summary["calibration"].items():
        for name, r in rows.items():
            lines.append(f"| {method} | {name} | {r['tau']:.4g} | {r['offset']:.3g} | "
                         f"{r['nll']:.3f} | {r['exemplar_mass']:.3f} | {r['ece@10']:.3f} |")
    return "\n".join(lines)
