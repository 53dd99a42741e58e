"""The words prompts are made of and matched with: caption synonyms per VOC class, plausible
VOC pairs, prompt templates, and the one class-word table (:func:`class_synonyms`) that the
prompt-file reader and the prompt bank share."""
from __future__ import annotations

from pccfast.core.labelset import VOC_CLASSES, LabelSet

__all__ = ["VOC_SYNONYMS", "VOC_PAIRS", "VOC_NOUNS", "NOT_CLASSES", "SINGLE_TEMPLATES", "PAIR_TEMPLATES",
           "RELATION_TEMPLATES", "is_voc", "class_synonyms"]

# Words in captions that stand for a VOC class (the class's own name and text are added
# automatically). Plurals ending in -s/-es are matched by the finder; irregular ones are listed.
VOC_SYNONYMS: dict[str, tuple[str, ...]] = {
    "aeroplane": ("airplane", "aeroplane", "plane", "airliner", "aircraft", "jet", "jetliner", "seaplane"),
    "bicycle": ("bicycle", "bike", "push bike", "mountain bike"),
    "bird": ("bird", "parrot", "duck", "seagull", "gull", "eagle", "owl", "pigeon", "swan", "goose", "geese",
             "sparrow", "hen", "rooster", "penguin", "flamingo", "hummingbird"),
    "boat": ("boat", "ship", "sailboat", "yacht", "canoe", "kayak", "ferry", "rowboat", "speedboat"),
    "bottle": ("bottle", "wine bottle", "water bottle", "beer bottle"),
    "bus": ("bus", "busses", "double decker", "double-decker"),
    "car": ("car", "taxi", "cab", "suv", "sedan", "jeep", "van", "hatchback", "convertible"),
    "cat": ("cat", "kitten", "kitty", "tabby"),
    "chair": ("chair", "armchair", "stool", "deck chair", "rocking chair", "office chair"),
    "cow": ("cow", "cattle", "calf", "calves", "bull", "ox", "oxen", "heifer"),
    "diningtable": ("dining table", "diningtable", "table", "kitchen table", "coffee table"),
    "dog": ("dog", "puppy", "puppies", "pup", "doggy"),
    "horse": ("horse", "pony", "ponies", "foal", "stallion", "mare"),
    "motorbike": ("motorbike", "motorcycle", "motor bike", "motor cycle", "scooter", "moped", "dirt bike"),
    "person": ("person", "persons", "people", "man", "men", "woman", "women", "child", "children", "kid",
               "boy", "girl", "baby", "babies", "guy", "lady", "ladies", "player", "toddler", "teenager",
               "family", "crowd", "skier", "surfer", "rider", "cyclist", "gentleman", "gentlemen", "officer", "policeman", "policemen"),
    "pottedplant": ("potted plant", "pot plant", "pottedplant", "plant", "houseplant", "house plant", "flower pot",
                    "flowerpot", "bonsai", "succulent", "potted flower", "cactus", "cacti"),
    "sheep": ("sheep", "lamb", "ewe"),
    "sofa": ("sofa", "couch", "settee", "loveseat", "futon"),
    "train": ("train", "locomotive", "tram", "streetcar", "subway", "railcar", "train car"),
    "tvmonitor": ("tv", "tvs", "television", "monitor", "tv monitor", "tvmonitor", "computer monitor",
                  "flat screen", "flatscreen"),
}
# Phrases that contain a class word but do not show that class; matched (and dropped) first.
NOT_CLASSES = ("hot dog", "corn dog", "bird's eye", "birds eye", "table tennis", "time table", "power plant",
                "man made", "man-made", "horse power", "train of thought", "cat walk", "jet ski")

# Plausible VOC pairs for the prompt bank: (class, class, relation from the first to the second).
VOC_PAIRS: tuple[tuple[str, str, str], ...] = (
    ("person", "horse", "riding"), ("person", "bicycle", "riding"), ("person", "motorbike", "riding"),
    ("person", "dog", "walking"), ("person", "boat", "rowing"), ("person", "sofa", "sitting on"),
    ("person", "chair", "sitting on"), ("person", "car", "standing next to"), ("person", "bus", "getting on"),
    ("person", "train", "waiting for"), ("person", "tvmonitor", "watching"), ("person", "bottle", "holding"),
    ("person", "diningtable", "sitting at"), ("person", "cat", "holding"), ("person", "sheep", "herding"),
    ("person", "cow", "feeding"), ("person", "aeroplane", "boarding"), ("person", "pottedplant", "watering"),
    ("dog", "sofa", "lying on"), ("cat", "sofa", "sleeping on"), ("cat", "chair", "sitting on"),
    ("bottle", "diningtable", "standing on"), ("pottedplant", "diningtable", "standing on"),
    ("tvmonitor", "sofa", "in front of"), ("chair", "diningtable", "pushed under"), ("sheep", "cow", "grazing with"),
    ("bus", "car", "driving behind"), ("bird", "boat", "perched on"), ("dog", "car", "looking out of"),
    ("horse", "cow", "standing in a field with"), ("cat", "tvmonitor", "sitting in front of"),
    ("bird", "pottedplant", "perched on"), ("train", "car", "passing"), ("aeroplane", "bird", "flying above"),
    ("dog", "cat", "playing with"), ("motorbike", "car", "parked next to"), ("bicycle", "car", "leaning against"),
    ("sheep", "dog", "guarded by"),
)
# Natural nouns for the VOC classes whose names are run together.
VOC_NOUNS = {"aeroplane": "airplane", "diningtable": "dining table", "pottedplant": "potted plant",
              "tvmonitor": "tv monitor"}

SINGLE_TEMPLATES: tuple[str, ...] = (
    "a photo of {a}",
    "a close-up photo of {a}",
    "a high quality photo of {a}",
    "{a} in natural light",
    "a realistic picture of {a}",
    "a wide shot of {a}",
    "a snapshot of {a}",
    "{a}, seen from the side",
    "an old photo of {a}",
    "a colour photograph of {a}, sharp focus",
    "{a} in a typical setting",
    "a photo of {a} on a cloudy day",
)
PAIR_TEMPLATES: tuple[str, ...] = (
    "a photo of {a} and {b}",
    "{a} next to {b}",
    "{a} and {b} in the same scene",
    "a picture of {a} near {b}",
    "{a} beside {b}, natural light",
    "a realistic photo with {a} and {b}",
    "{a} in front of {b}",
    "a wide shot of {a} and {b}",
)
RELATION_TEMPLATES: tuple[str, ...] = (
    "{a} {rel} {b}",
    "a photo of {a} {rel} {b}",
    "{a} {rel} {b}, realistic photo",
    "a candid shot of {a} {rel} {b}",
)


def is_voc(label_set: LabelSet) -> bool:
    return tuple(c.lower() for c in label_set.classes) == VOC_CLASSES


def class_synonyms(label_set: LabelSet) -> dict[str, str]:
    """Lower-case word or phrase -> class name, for every non-background class: its name, its
    text, the VOC table (for the VOC classes) and ``label_set.synonyms`` (``{class: [words]}``
    or ``{class: "word"}``). ValueError if ``synonyms`` names a class that is not in the set."""
    table: dict[str, str] = {}
    voc = is_voc(label_set)
    for name, text in zip(label_set.classes[1:], label_set.texts[1:]):
        words = [name, text, name.replace("_", " ")]
        if voc:
            words += [VOC_NOUNS.get(name, name), *VOC_SYNONYMS.get(name, ())]
        for w in words:
            table.setdefault(w.strip().lower(), name)
    lookup = {c.lower(): c for c in label_set.classes[1:]}
    for cls, words in (label_set.synonyms or {}).items():
        if str(cls).lower() not in lookup:
            raise ValueError(f"label set {label_set.name!r}: 'synonyms' names {cls!r}, which is not one of its classes")
        for w in [words] if isinstance(words, str) else list(words):
            if not isinstance(w, str) or not w.strip():
                raise ValueError(f"label set {label_set.name!r}: the synonyms of {cls!r} have to be non-empty strings but hold {w!r}")
            table[w.strip().lower()] = lookup[str(cls).lower()]
    return table
