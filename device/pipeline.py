"""The first pipeline: images dropped into a folder -> model -> result records.

Runs in its own thread so inference never waits on the network. It asks the engine for the model
by name on every image, so a new version takes over between two images and none is dropped.
After each result, `on_inference` (the shadow gate's hook during probation) sees the input tensors
and the outputs; it runs after the result has been acted on, so it never delays one.
"""

import json
import logging
import shutil
import threading
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from PIL import UnidentifiedImageError

from device.engine.backends.base import Tensors
from device.engine.engine import Engine
from device.engine.preprocess import load_image
from device.errors import EngineError

log = logging.getLogger(__name__)
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp"}
# model name, version, inputs, outputs, latency in ms
InferenceHook = Callable[[str, int, Tensors, Tensors, float], None]


class FolderPipeline:
    def __init__(
        self,
        engine: Engine,
        model_name: str,
        inbox: Path,
        processed: Path,
        rejected: Path,
        results: Path,
        poll_s: float,
        on_result: Callable[[dict[str, Any]], None] | None = None,
        on_inference: InferenceHook | None = None,
    ) -> None:
        self.engine = engine
        self.model_name = model_name
        self.inbox = inbox
        self.processed = processed
        self.rejected = rejected
        self.results_file = results / "results.jsonl"
        self.poll_s = poll_s
        self.on_result = on_result
        self.on_inference = on_inference
        self.by_version: Counter[int] = Counter()
        self.by_label: Counter[str] = Counter()
        self.rejected_count = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="pipeline", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    def _loop(self) -> None:
        while not self._stop.is_set():
            images = sorted(p for p in self.inbox.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
            for path in images:
                if self._stop.is_set():
                    return
                try:
                    self.process(path)
                except Exception:  # an unforeseen failure costs this image, never the pipeline
                    log.exception("pipeline failed on %s", path.name)
                    self.rejected_count += 1
                    if path.exists():
                        shutil.move(path, self.rejected / path.name)
            self._stop.wait(self.poll_s)

    def process(self, path: Path) -> None:
        serving = self.engine.get(self.model_name)
        manifest = serving.manifest
        try:
            if manifest.preprocessing is None:
                raise EngineError(f"{manifest.name} declares no preprocessing for images")
            inputs = {manifest.inputs[0].name: load_image(path, manifest.preprocessing)}
            start = time.perf_counter()
            outputs = self.engine.run(self.model_name, inputs)
            latency_ms = (time.perf_counter() - start) * 1000
        except (UnidentifiedImageError, OSError, EngineError) as e:
            log.warning("rejected %s: %s", path.name, e)
            self.rejected_count += 1
            shutil.move(path, self.rejected / path.name)
            return
        scores = outputs[manifest.outputs[0].name][0]
        best = int(np.argmax(scores))
        label = manifest.labels[best] if best < len(manifest.labels) else str(best)
        record = {
            "ts": time.time(),
            "file": path.name,
            "label": label,
            "score": float(scores[best]),
            "model": manifest.name,
            "version": manifest.version,
            "backend": serving.backend,
            "latency_ms": round(latency_ms, 3),
        }
        with self.results_file.open("a") as f:
            f.write(json.dumps(record) + "\n")
        shutil.move(path, self.processed / path.name)
        if self.on_result is not None:
            self.on_result(record)
        self.by_version[manifest.version] += 1
        self.by_label[label] += 1
        if self.on_inference is not None:
            try:
                self.on_inference(self.model_name, manifest.version, inputs, outputs, latency_ms)
            except Exception:  # an observer's failure costs nothing: the image has its result
                log.exception("inference hook failed on %s", path.name)
