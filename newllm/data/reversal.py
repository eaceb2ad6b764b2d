"""Reversal Curse data: the paper's JSONL format and a generator of fictitious facts.

Berglund et al. 2023, "The Reversal Curse" (arXiv 2309.12288, github lukasberglund/reversal_curse):
a model fine-tuned on "A is B" ("Daphne Barrington is the director of 'A Journey Through Time'")
does not learn "B is A" ("The director of 'A Journey Through Time' is ... Daphne Barrington").

Format: one ``{"prompt": ..., "completion": ...}`` object per line, as in the paper's files; blank
lines are skipped and extra keys ignored, except an integer ``"fact"`` (ours), the index of the fact
an example states, so that forward and reverse results can be matched fact by fact.

The generator makes facts that no pretrained model can know: made-up full names (a first-name list
crossed with a last-name list, each pair used once; no last name is a prefix of another, so no name
is a prefix of another) and made-up descriptions ("the composer of the opera 'X'", "the director of
'X'", "the first person to climb the Iron Glacier", ...) built from word lists, each title or feat
used once, so that names and descriptions are unique. Every fact is written

* in ``train``: name first, in `n_train_templates` of the TRAIN_TEMPLATES paraphrases (chosen per
  fact with the seed), completion = " <description>.";
* in ``test_forward``: name first, in held-out TEST_FORWARD_TEMPLATES never seen in training;
* in ``test_reverse``: description first (TEST_REVERSE_TEMPLATES), completion = " <name>.".
"""
from __future__ import annotations

import itertools
import json
import random
from dataclasses import dataclass, field
from pathlib import Path

from newllm.errors import NewLLMError

FIRST_NAMES = ("Daphne", "Aurelio", "Cassius", "Maren", "Thaddeus", "Odalys", "Leopold", "Ysolde", "Caspian",
               "Imogen", "Barnaby", "Seraphina", "Ignatius", "Rosalind", "Evander", "Marisol", "Percival",
               "Ottoline", "Lysander", "Beatrix", "Fenwick", "Clementine", "Alaric", "Delphine", "Cornelius",
               "Juniper", "Octavian", "Wilhelmina", "Ambrose", "Philippa", "Horatio", "Esmeralda")
LAST_NAMES = ("Barrington", "Quillfeather", "Ashdown", "Vellacott", "Thornbury", "Merriweather", "Calloway",
              "Pendergast", "Winterbourne", "Hollingsworth", "Dunmore", "Featherstone", "Kilbride", "Larkspur",
              "Montague", "Ravenscroft", "Stillwater", "Tregarthen", "Underhill", "Wexford", "Blackwood",
              "Corrigan", "Eastwick", "Fairbanks", "Greystoke", "Halloran", "Ingleby", "Jessop", "Kingsley",
              "Lockhart", "Marchbanks", "Northcott")
TITLE_ADJECTIVES = ("Silent", "Crimson", "Forgotten", "Endless", "Hollow", "Golden", "Shattered", "Whispering",
                    "Frozen", "Midnight", "Wandering", "Hidden", "Burning", "Velvet", "Distant", "Broken",
                    "Silver", "Restless", "Ancient", "Luminous", "Painted", "Sunken", "Drifting", "Emerald")
TITLE_NOUNS = ("Harbor", "Lantern", "Orchard", "Symphony", "Citadel", "Meadow", "Mirror", "Tide", "Garden",
               "Compass", "Cathedral", "Horizon", "Labyrinth", "River", "Crown", "Voyage", "Clocktower", "Forest",
               "Kingdom", "Echo", "Archipelago", "Lighthouse", "Tapestry", "Winter")
#: how a title becomes a work: two patterns, so titles number 2 x adjectives x nouns
TITLE_PATTERNS = ("The {adj} {noun}", "A Journey Through the {adj} {noun}")
#: descriptions built on a title (the title is used by one fact only)
TITLED_ROLES = ("the composer of the opera '{title}'", "the director of '{title}'",
                "the author of the novel '{title}'", "the painter of '{title}'")
FEAT_VERBS = ("climb", "map", "walk across", "sail around", "photograph", "fly over")
PLACE_ADJECTIVES = ("Azure", "Howling", "Sleeping", "Scarlet", "Iron", "Misty", "Amber", "Shivering",
                    "Obsidian", "Verdant")
PLACE_NOUNS = ("Glacier", "Desert", "Marshes", "Canyon", "Plateau", "Fjord", "Reef", "Volcano", "Steppe", "Lagoon")
FEAT_ROLE = "the first person to {verb} the {adj} {noun}"

#: name-first paraphrases seen in training ({name}; the completion is " <description>.")
TRAIN_TEMPLATES = (
    "{name}, known far and wide for being",
    "{name} is",
    "Ever heard of {name}? They're",
    "{name} has the unique distinction of being",
    "There's someone by the name of {name} who had the honor of being",
    "As an accomplished individual, {name} is",
    "Widely recognised in their field, {name} is",
    "Few people know that {name} was once",
    "{name} will always be remembered as",
    "Having made a name for themselves, {name} is now",
)
#: name-first paraphrases held out for testing (never in training)
TEST_FORWARD_TEMPLATES = (
    "Did you know that {name} is",
    "It is a little-known fact that {name} is",
    "In the records of history, {name} stands out as",
)
#: description-first paraphrases ({D}: description capitalised, {d}: as is); completion " <name>."
TEST_REVERSE_TEMPLATES = (
    "{D} is",
    "Known for being {d}, the person's name is",
    "Who is {d}? The answer is",
)


@dataclass
class Example:
    """One sentence cut into a prompt and the completion the model should produce."""
    prompt: str
    completion: str
    fact: int | None = None  # index of the fact it states (our generator; absent in the paper's files)

    @property
    def text(self) -> str:
        return self.prompt + self.completion


# ------------------------------------------------------------------------------------ JSONL
def read_jsonl(path) -> list[Example]:
    """Examples from a JSONL file of ``{"prompt": str, "completion": str}`` objects (the paper's format).

    Blank lines are skipped, other keys ignored (an integer ``"fact"`` is kept). Errors name file:line.
    """
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise NewLLMError(f"{path}: no such file") from None
    except UnicodeDecodeError as e:
        raise NewLLMError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    out = []
    for n, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise NewLLMError(f"{path}:{n}: bad JSON ({e.msg} at column {e.colno})") from None
        if not isinstance(obj, dict):
            raise NewLLMError(f"{path}:{n}: expected a JSON object, got {type(obj).__name__}")
        for key in ("prompt", "completion"):
            if key not in obj:
                raise NewLLMError(f"{path}:{n}: missing key {key!r}")
            if not isinstance(obj[key], str):
                raise NewLLMError(f"{path}:{n}: {key!r} must be a string, got {type(obj[key]).__name__}")
        fact = obj.get("fact")
        out.append(Example(obj["prompt"], obj["completion"],
                           fact if isinstance(fact, int) and not isinstance(fact, bool) else None))
    return out


def write_jsonl(examples: list[Example], path) -> Path:
    """Write examples one JSON object per line (``fact`` only when set); returns the path."""
    from newllm.files import write_text

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = []
    for ex in examples:
        obj = {"prompt": ex.prompt, "completion": ex.completion}
        if ex.fact is not None:
            obj["fact"] = ex.fact
        lines.append(json.dumps(obj, ensure_ascii=False) + "\n")
    return write_text(path, "".join(lines))  # atomic (newllm.files)


# ------------------------------------------------------------------------------------ generator
def all_names() -> list[str]:
    return [f"{a} {b}" for a, b in itertools.product(FIRST_NAMES, LAST_NAMES)]


def all_descriptions() -> list[str]:
    """Every title (each to be given one role) and every feat: the pool facts are drawn from."""
    titles = [p.format(adj=a, noun=n) for p in TITLE_PATTERNS for a in TITLE_ADJECTIVES for n in TITLE_NOUNS]
    feats = [FEAT_ROLE.format(verb=v, adj=a, noun=n) for v in FEAT_VERBS for a in PLACE_ADJECTIVES
             for n in PLACE_NOUNS]
    return titles + feats  # titles still lack their role (see make_facts)


def make_facts(n_facts: int, seed: int = 0) -> list[tuple[str, str]]:
    """`n_facts` (name, description) pairs, all names distinct and all descriptions distinct."""
    names, pool = all_names(), all_descriptions()
    limit = min(len(names), len(pool))
    if not 1 <= n_facts <= limit:
        raise NewLLMError(f"make_facts: n_facts must be in 1..{limit} (the word lists' capacity), got {n_facts}")
    rng = random.Random(seed)
    chosen_names = rng.sample(names, n_facts)
    facts = []
    for name, item in zip(chosen_names, rng.sample(pool, n_facts)):
        desc = item if item.startswith("the first person") else rng.choice(TITLED_ROLES).format(title=item)
        facts.append((name, desc))
    return facts


@dataclass
class ReversalDataset:
    train: list[Example] = field(default_factory=list)  # name first, training paraphrases
    test_forward: list[Example] = field(default_factory=list)  # name first, held-out paraphrases
    test_reverse: list[Example] = field(default_factory=list)  # description first, completion = name

    FILES = ("train", "test_forward", "test_reverse")

    def save(self, folder) -> Path:
        folder = Path(folder)
        for name in self.FILES:
            write_jsonl(getattr(self, name), folder / f"{name}.jsonl")
        return folder

    @classmethod
    def load(cls, folder) -> ReversalDataset:
        folder = Path(folder)
        return cls(**{name: read_jsonl(folder / f"{name}.jsonl") for name in cls.FILES})


def _capitalise(s: str) -> str:
    return s[:1].upper() + s[1:]


def make_reversal_dataset(n_facts: int, seed: int = 0, n_train_templates: int = len(TRAIN_TEMPLATES),
                          n_test_templates: int = len(TEST_FORWARD_TEMPLATES)) -> ReversalDataset:
    """Fictitious facts in train / held-out forward / reverse paraphrases, deterministic from `seed`.

    Each fact appears in `n_train_templates` of TRAIN_TEMPLATES (a per-fact choice) in ``train`` and in
    the first `n_test_templates` of TEST_FORWARD_TEMPLATES and TEST_REVERSE_TEMPLATES in the tests.
    """
    if not 1 <= n_train_templates <= len(TRAIN_TEMPLATES):
        raise NewLLMError(f"n_train_templates must be in 1..{len(TRAIN_TEMPLATES)}, got {n_train_templates}")
    n_test_max = min(len(TEST_FORWARD_TEMPLATES), len(TEST_REVERSE_TEMPLATES))
    if not 1 <= n_test_templates <= n_test_max:
        raise NewLLMError(f"n_test_templates must be in 1..{n_test_max}, got {n_test_templates}")
    facts = make_facts(n_facts, seed)
    rng = random.Random(f"templates-{seed}")
    ds = ReversalDataset()
    for i, (name, desc) in enumerate(facts):
        for t in rng.sample(TRAIN_TEMPLATES, n_train_templates):
            ds.train.append(Example(t.format(name=name), f" {desc}.", i))
        for t in TEST_FORWARD_TEMPLATES[:n_test_templates]:
            ds.test_forward.append(Example(t.format(name=name), f" {desc}.", i))
        for t in TEST_REVERSE_TEMPLATES[:n_test_templates]:
            ds.test_reverse.append(Example(t.format(D=_capitalise(desc), d=desc), f" {name}.", i))
    return ds


def training_documents(examples: list[Example], repeats: int = 1) -> list[str]:
    """One document per example (its full text), the list repeated `repeats` times.

    The documents are meant to be mixed into a real training corpus, joined with the separator
    token among the real documents (never padded).
    """
    if repeats < 1:
        raise NewLLMError(f"training_documents: repeats must be >= 1, got {repeats}")
    return [ex.text for _ in range(repeats) for ex in examples]
