"""Sentence pairs for the corpus fine-tunes: factory-floor events, each said two ways.

A pair is one event (a machine, a part, a symptom, a shift, an action) written from two different
templates with different synonyms, so a contrastive objective must learn that they mean the same
while the other pairs in the batch do not. Seeded: the same pairs on every run.
"""

import random

MACHINES = [
    ("conveyor", "belt conveyor"),
    ("press", "hydraulic press"),
    ("lathe", "CNC lathe"),
    ("mill", "milling machine"),
    ("robot arm", "welding robot"),
    ("packer", "packaging line"),
    ("oven", "curing oven"),
    ("compressor", "air compressor"),
    ("pump", "coolant pump"),
    ("extruder", "plastic extruder"),
    ("injection molder", "molding machine"),
    ("sorter", "vision sorter"),
    ("labeler", "label applicator"),
    ("palletizer", "pallet robot"),
    ("grinder", "surface grinder"),
    ("drill", "drill press"),
]
PARTS = [
    ("bearing", "ball bearing"),
    ("motor", "drive motor"),
    ("belt", "drive belt"),
    ("nozzle", "spray nozzle"),
    ("gripper", "vacuum gripper"),
    ("sensor", "proximity sensor"),
    ("camera", "inspection camera"),
    ("valve", "pneumatic valve"),
    ("spindle", "main spindle"),
    ("heater", "heating element"),
    ("filter", "air filter"),
    ("gearbox", "reduction gearbox"),
]
SYMPTOMS = [
    ("overheated", "ran too hot", "exceeded its temperature limit"),
    ("vibrated badly", "showed strong vibration", "shook more than normal"),
    ("stopped", "came to a halt", "shut down unexpectedly"),
    ("made a grinding noise", "sounded rough", "produced an unusual noise"),
    ("leaked oil", "was dripping lubricant", "lost oil"),
    ("drifted out of tolerance", "went out of spec", "lost its calibration"),
    ("jammed", "got stuck", "blocked the line"),
    ("lost pressure", "dropped in pressure", "could not hold pressure"),
    ("reported a fault code", "raised an alarm", "threw an error"),
    ("ran slower than usual", "lost speed", "fell below its cycle time"),
]
DEFECTS = [
    ("scratches", "surface scratches"),
    ("cracks", "hairline cracks"),
    ("dents", "small dents"),
    ("burrs", "sharp burrs"),
    ("discoloration", "color defects"),
    ("porosity", "pores in the casting"),
    ("misaligned labels", "crooked labels"),
    ("short shots", "incomplete moldings"),
]
SHIFTS = [
    ("during the night shift", "overnight"),
    ("in the morning shift", "early in the day"),
    ("on the late shift", "in the evening"),
    ("over the weekend", "on Saturday"),
    ("right after the restart", "just after start-up"),
    ("during the changeover", "while switching products"),
]
ACTIONS = [
    ("was replaced", "got swapped for a new one"),
    ("was cleaned", "was cleaned out"),
    ("was recalibrated", "got a new calibration"),
    ("was lubricated", "received fresh grease"),
    ("was tightened", "had its fasteners retorqued"),
    ("was inspected", "was checked by maintenance"),
]

TEMPLATES_EVENT = [
    "The {part} on {machine} {line} {symptom} {shift}.",
    "{shift_cap}, the {part} of the {machine} at {line} {symptom}.",
    "Operator note: {machine} {line}, {part} {symptom} {shift}.",
    "Maintenance ticket: {part} {symptom} on the {machine} in {line} {shift}.",
    "We saw that the {machine} on {line} {symptom} because of its {part} {shift}.",
]
TEMPLATES_DEFECT = [
    "Inspection found {defect} on parts from the {machine} at {line}.",
    "The camera flagged {defect} coming off {line}'s {machine} {shift}.",
    "Quality alert: {defect} detected after the {machine} on {line}.",
    "Parts from {line} show {defect}; the {machine} is suspected.",
]
TEMPLATES_ACTION = [
    "The {part} on the {machine} at {line} {action}.",
    "Maintenance report: {line} {machine}, the {part} {action} {shift}.",
    "{shift_cap} the {machine}'s {part} in {line} {action}.",
]


def _line(rng: random.Random) -> tuple[str, str]:
    n = rng.randrange(1, 13)
    return f"line {n}", rng.choice([f"line {n}", f"production line {n}", f"cell {n}"])


def _fill(template: str, slots: dict[str, str]) -> str:
    text = template.format(**slots, shift_cap=slots["shift"][:1].upper() + slots["shift"][1:])
    return " ".join(text.split())


def sentence_pairs(count: int, seed: int = 0) -> list[tuple[str, str]]:
    """`count` (anchor, paraphrase) pairs of factory-floor events."""
    rng = random.Random(seed)
    pairs: list[tuple[str, str]] = []
    while len(pairs) < count:
        machine, part, shift, line = (
            rng.choice(MACHINES),
            rng.choice(PARTS),
            rng.choice(SHIFTS),
            _line(rng),
        )
        kind = rng.random()
        if kind < 0.5:
            symptom, templates = rng.choice(SYMPTOMS), TEMPLATES_EVENT
            extra = {"symptom": symptom}
        elif kind < 0.8:
            defect, templates = rng.choice(DEFECTS), TEMPLATES_DEFECT
            extra = {"defect": defect}
        else:
            action, templates = rng.choice(ACTIONS), TEMPLATES_ACTION
            extra = {"action": action}
        a_t, b_t = rng.sample(templates, 2)
        sides = []
        for side, template in enumerate((a_t, b_t)):
            slots = {
                "machine": machine[side],
                "part": part[side],
                "shift": shift[side],
                "line": line[side],
                **{k: v[side % len(v)] if side == 0 else rng.choice(v[1:]) for k, v in extra.items()},
            }
            sides.append(_fill(template, slots))
        pairs.append((sides[0], sides[1]))
    return pairs
