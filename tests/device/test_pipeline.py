import json
from pathlib import Path

from device.engine.engine import Engine
from device.pipeline import FolderPipeline
from models.manifest import load_manifest
from models.zoo.surface_data import write_images


def test_classifies_images_and_quarantines_broken_ones(engine: Engine, zoo: Path, tmp_path: Path) -> None:
    engine.serve(engine.prepare(zoo / "v2", load_manifest(zoo / "v2")))
    folders = {name: tmp_path / name for name in ("inbox", "processed", "rejected", "results")}
    for folder in folders.values():
        folder.mkdir()
    written = write_images(folders["inbox"], 8, seed=5)
    (folders["inbox"] / "broken.png").write_bytes(b"not a png")
    pipeline = FolderPipeline(engine, "surface-defect", *folders.values(), poll_s=0.01)
    for path in sorted(folders["inbox"].iterdir()):
        pipeline.process(path)

    records = [json.loads(line) for line in (folders["results"] / "results.jsonl").read_text().splitlines()]
    assert len(records) == 8 and {r["version"] for r in records} == {2}
    correct = sum(r["label"] == label for r, (_, label) in zip(records, sorted(written), strict=True))
    assert correct >= 6, f"the trained model should get most images right, got {correct}/8"
    assert (folders["rejected"] / "broken.png").exists() and pipeline.rejected_count == 1
    assert not list(folders["inbox"].iterdir())
    assert pipeline.by_version[2] == 8
