"""AWQ calibration text for the demo model, generated from the same world as its pictures.

One line per picture: what it shows, then every question that applies with its answer. The
quantizer reads one sample per line (`calibration_blocks`), so the chat template's newlines
are not used here; the words and the short-answer style are the demo's own.
"""

from __future__ import annotations

from vilaserve.adapters.offline.demo import shapes

CALIBRATION_SEED = 20_000  # train-split pictures no training run reaches with its indices


def calibration_lines(count: int, seed: int = CALIBRATION_SEED) -> list[str]:
    lines = []
    for example in shapes.examples("train", seed, count):
        scene = example.scene
        parts = [f"The picture shows {scene.answer('describe')}."]
        for kind in shapes.VOCABULARY:
            if scene.kind in kind.scenes:
                for phrasing in kind.phrasings[scene.kind][:2]:
                    shape = scene.shape or ""
                    question = phrasing.format(shape=shape, shapes=shapes.PLURALS.get(shape, ""))
                    parts.append(f"{question} {scene.answer(kind.name)}.")
        lines.append(" ".join(parts))
    return lines
