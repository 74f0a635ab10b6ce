"""`synthetic-facts`: a seeded knowledge base of fictional people and places, rendered as prose.

Because every entity is invented, a model can only know a fact if it saw it in training. That
makes the corpus a clean probe of memory and hallucination: `questions()` asks about entities
that appear in the training text ("seen") and about entities that never do ("unseen"), and a
model that answers an unseen-entity question confidently is hallucinating by construction.
The question set is held out: no question-form sentence is ever rendered into the corpus.

Its size is a knob, so that a small model can memorise what it saw: `FactsSpec` (written
`synthetic-facts:entities=N,repeat=R,qa=F` wherever a corpus is named) sets the number of people
(`entities`; cities are a fifth of that), how many differently-worded documents describe each
seen entity (`repeat`), and the fraction `qa` of seen entities whose questions are also rendered,
answered, in the factqa prompt's format ("Q: ...\nA: ...") — the mixed training that lets a model
learn to extract what it memorised from prose (Allen-Zhu and Li, "Physics of Language Models
3.1"); factqa then asks only about the other entities. The default (1200 people, 3 renderings,
no question-answer documents) is the original corpus.

Everything is a pure function of the seed and the spec, so the corpus, the split and the
questions are identical on every machine.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from functools import lru_cache
from typing import Optional

SEED = 20261122
N_PEOPLE = 1200
N_CITIES = 240
N_COUNTRIES = 24
UNSEEN_FRACTION = 0.2
RENDERINGS = 3  # each seen entity is described in this many differently-worded documents

_ONSETS = ["b", "c", "d", "f", "g", "h", "j", "k", "l", "m", "n", "p", "r", "s", "t", "v", "w", "z",
           "br", "dr", "gr", "kr", "st", "th", "sh", "ch", "tr", "vl", "qu", "fl"]
_VOWELS = ["a", "e", "i", "o", "u", "ae", "ia", "ou", "ei", "y"]
_CODAS = ["", "", "n", "r", "l", "s", "th", "m", "nd", "rk", "x", "v"]
_OCCUPATIONS = ["cartographer", "glassblower", "astronomer", "botanist", "clockmaker", "composer",
                "shipwright", "archivist", "beekeeper", "bridge engineer", "lens grinder", "weaver",
                "physician", "violin maker", "surveyor", "chemist", "printer", "lighthouse keeper",
                "mathematician", "ferry captain"]
_WORKS = ["the tidal engine", "a folding telescope", "the salt ledger", "a map of the northern reefs",
          "the copper loom", "a treatise on frost", "the hanging gardens survey", "a cipher for lamps",
          "the river calendar", "a glass harmonica", "the stone bell", "a catalogue of moths"]


@dataclass(frozen=True)
class Person:
    id: str
    name: str
    birth_year: int
    birthplace: str
    occupation: str
    known_for: str
    seen: bool


@dataclass(frozen=True)
class City:
    id: str
    name: str
    country: str
    founded: int
    river: str
    seen: bool


@dataclass(frozen=True)
class KnowledgeBase:
    people: tuple[Person, ...]
    cities: tuple[City, ...]
    countries: tuple[str, ...]


def _word(rng: random.Random, syllables: int) -> str:
    parts = []
    for _ in range(syllables):
        parts.append(rng.choice(_ONSETS) + rng.choice(_VOWELS) + rng.choice(_CODAS))
    return "".join(parts).capitalize()


def _unique_words(rng: random.Random, n: int, syllables: tuple[int, int], taken: set[str]) -> list[str]:
    out = []
    while len(out) < n:
        w = _word(rng, rng.randint(*syllables))
        if w not in taken and len(w) >= 4:
            taken.add(w)
            out.append(w)
    return out


NAME = "synthetic-facts"
MAX_ENTITIES = 100_000
MAX_REPEAT = 1000


class FactsSpecError(ValueError):
    """A `synthetic-facts:...` spec that cannot be read; the message names the fix."""


@dataclass(frozen=True)
class FactsSpec:
    """How big the knowledge base is: `entities` people (and a fifth as many cities), each seen
    entity rendered in `repeat` documents. `text` is the canonical corpus name."""

    entities: int = N_PEOPLE
    repeat: int = RENDERINGS
    qa: float = 0.0

    @property
    def cities(self) -> int:
        return N_CITIES if self.entities == N_PEOPLE else max(10, self.entities // 5)

    @property
    def text(self) -> str:
        if (self.entities, self.repeat, self.qa) == (N_PEOPLE, RENDERINGS, 0.0):
            return NAME
        return f"{NAME}:entities={self.entities},repeat={self.repeat}" + (f",qa={self.qa:g}" if self.qa else "")

    @classmethod
    def parse(cls, spec: str) -> "FactsSpec":
        """`synthetic-facts`, or `synthetic-facts:entities=N,repeat=R,qa=F` (any key may be left out)."""
        name, _, options = spec.partition(":")
        if name != NAME:
            raise FactsSpecError(f"{spec!r} is not a synthetic-facts corpus")
        values: dict[str, float] = {}
        for part in filter(None, options.split(",")):
            key, eq, raw = part.partition("=")
            key = key.strip()
            if key not in ("entities", "repeat", "qa") or not eq:
                raise FactsSpecError(f"{spec!r}: write synthetic-facts:entities=N,repeat=R,qa=F (unknown part {part!r})")
            try:
                values[key] = float(raw) if key == "qa" else int(raw)
            except ValueError:
                kind = "a fraction" if key == "qa" else "a whole number"
                raise FactsSpecError(f"{spec!r}: {key} must be {kind}, got {raw!r}") from None
        out = cls(**values)
        if not 10 <= out.entities <= MAX_ENTITIES or not 1 <= out.repeat <= MAX_REPEAT or not 0 <= out.qa < 1:
            raise FactsSpecError(f"{spec!r}: entities must be 10..{MAX_ENTITIES}, repeat 1..{MAX_REPEAT} "
                                 "and qa in [0, 1)")
        return out


def is_facts(spec: Optional[str]) -> bool:
    return isinstance(spec, str) and spec.partition(":")[0] == NAME


@lru_cache(maxsize=8)
def knowledge_base(seed: int = SEED, size: FactsSpec = FactsSpec()) -> KnowledgeBase:
    rng = random.Random(seed)
    taken: set[str] = set()
    countries = tuple(_unique_words(rng, N_COUNTRIES, (2, 3), taken))
    rivers = _unique_words(rng, 40, (2, 2), taken)
    city_names = _unique_words(rng, size.cities, (2, 3), taken)
    cities = tuple(
        City(
            id=f"city-{i:04d}",
            name=name,
            country=rng.choice(countries),
            founded=rng.randint(800, 1850),
            river=rng.choice(rivers),
            seen=rng.random() >= UNSEEN_FRACTION,
        )
        for i, name in enumerate(city_names)
    )
    seen_cities = [c for c in cities if c.seen]  # an unseen city must never be named in the corpus
    given = _unique_words(rng, max(300, size.entities // 4), (1, 2), taken)
    family = _unique_words(rng, max(600, size.entities // 2), (2, 3), taken)
    names: set[str] = set()
    people = []
    while len(people) < size.entities:
        name = f"{rng.choice(given)} {rng.choice(family)}"
        if name in names:
            continue
        names.add(name)
        people.append(
            Person(
                id=f"person-{len(people):04d}",
                name=name,
                birth_year=rng.randint(1650, 1990),
                birthplace=rng.choice(seen_cities).name,
                occupation=rng.choice(_OCCUPATIONS),
                known_for=rng.choice(_WORKS),
                seen=rng.random() >= UNSEEN_FRACTION,
            )
        )
    return KnowledgeBase(tuple(people), cities, countries)


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def _person_sentences(p: Person, rng: random.Random) -> list[str]:
    first = p.name.split()[0]
    born = rng.choice([
        f"{p.name} was born in {p.birthplace} in {p.birth_year}.",
        f"Born in {p.birth_year} in the city of {p.birthplace}, {p.name} spent a childhood there.",
        f"In {p.birth_year}, {p.name} was born in {p.birthplace}.",
    ])
    job = rng.choice([
        f"{first} worked as {_article(p.occupation)} {p.occupation}.",
        f"By trade, {p.name} was {_article(p.occupation)} {p.occupation}.",
        f"{first} became a well-known {p.occupation}.",
    ])
    fame = rng.choice([
        f"{first} is best remembered for {p.known_for}.",
        f"Today {p.name} is remembered chiefly for {p.known_for}.",
        f"The work most associated with {first} is {p.known_for}.",
    ])
    sentences = [job, fame]
    rng.shuffle(sentences)
    return [born] + sentences


def _city_sentences(c: City, rng: random.Random) -> list[str]:
    return [
        rng.choice([
            f"{c.name} is a city in {c.country}.",
            f"The city of {c.name} lies in {c.country}.",
            f"{c.name}, in {c.country}, is an old market town.",
        ]),
        rng.choice([
            f"It was founded in {c.founded} on the banks of the {c.river}.",
            f"Founded in {c.founded}, {c.name} grew up along the {c.river} river.",
            f"The {c.river} runs through {c.name}, which was founded in {c.founded}.",
        ]),
    ]


def qa_entities(seed: int = SEED, size: FactsSpec = FactsSpec()) -> frozenset[str]:
    """Ids of the seen entities whose questions the corpus also renders, answered (`size.qa` of
    them, each chosen by its own seeded draw, so the default knowledge base is untouched)."""
    if not size.qa:
        return frozenset()
    kb = knowledge_base(seed, size)
    return frozenset(e.id for e in (*kb.people, *kb.cities)
                     if e.seen and random.Random(f"{seed}:qa:{e.id}").random() < size.qa)


def documents(seed: int = SEED, size: FactsSpec = FactsSpec()) -> list[tuple[str, str]]:
    """(doc_id, text) for every rendering of every seen entity, and for the `qa_entities` their
    answered questions in the factqa format; unseen entities never appear."""
    kb = knowledge_base(seed, size)
    docs = []
    answered = qa_entities(seed, size)
    by_entity: dict[str, list[dict]] = {}
    for q in questions(seed, size) if answered else ():
        by_entity.setdefault(q["id"].split(":")[0], []).append(q)
    for r in range(size.repeat):
        for entity_id in sorted(answered):
            qs = list(by_entity[entity_id])
            random.Random(f"{seed}:{entity_id}:qa:{r}").shuffle(qs)
            docs.append((f"{entity_id}/qa{r}", "\n\n".join(f"Q: {q['question']}\nA: {q['answer']}." for q in qs)))
    for r in range(size.repeat):
        for p in kb.people:
            if p.seen:
                rng = random.Random(f"{seed}:{p.id}:{r}")
                docs.append((f"{p.id}/{r}", " ".join(_person_sentences(p, rng))))
        for c in kb.cities:
            if c.seen:
                rng = random.Random(f"{seed}:{c.id}:{r}")
                docs.append((f"{c.id}/{r}", " ".join(_city_sentences(c, rng))))
    return docs


def questions(seed: int = SEED, size: FactsSpec = FactsSpec()) -> list[dict]:
    """Held-out closed-book questions about seen and unseen entities, with reference answers."""
    kb = knowledge_base(seed, size)
    return [q for p in kb.people for q in _person_questions(p)] + [q for c in kb.cities for q in _city_questions(c)]


def _person_questions(p: Person) -> list[dict]:
    return [{"id": f"{p.id}:{key}", "entity": p.name, "seen": p.seen, "question": question, "answer": answer}
            for key, question, answer in (
                ("birth_year", f"In what year was {p.name} born?", str(p.birth_year)),
                ("birthplace", f"In which city was {p.name} born?", p.birthplace),
                ("occupation", f"What was {p.name}'s occupation?", p.occupation))]


def _city_questions(c: City) -> list[dict]:
    return [{"id": f"{c.id}:{key}", "entity": c.name, "seen": c.seen, "question": question, "answer": answer}
            for key, question, answer in (
                ("country", f"In which country is {c.name}?", c.country),
                ("founded", f"In what year was {c.name} founded?", str(c.founded)))]


def heldout_unseen(seed: int = SEED, size: FactsSpec = FactsSpec()) -> list[dict]:
    """Questions about invented entities that are neither in the knowledge base nor in the corpus:
    the unseen half of the critic's training data (HMST's `--stage critic`), so that the critic
    never learns from factqa's own unseen test entities. As many people and cities as the corpus
    answers questions about (`qa_entities`), at least 10 people and 2 cities; names are drawn
    apart from every knowledge-base name, from a stream of their own (the knowledge base is
    untouched). Same question forms and id scheme as `questions`, ids prefixed `heldout-`."""
    kb = knowledge_base(seed, size)
    answered = qa_entities(seed, size)
    n_people = max(10, sum(p.id in answered for p in kb.people))
    n_cities = max(2, sum(c.id in answered for c in kb.cities))
    rng = random.Random(f"{seed}:heldout")
    people_names = {p.name for p in kb.people}
    taken = ({c.name for c in kb.cities} | set(kb.countries) | {c.river for c in kb.cities}
             | {word for name in people_names for word in name.split()})  # every word is new
    city_names = _unique_words(rng, n_cities, (2, 3), taken)
    given = _unique_words(rng, max(40, n_people), (1, 2), taken)
    family = _unique_words(rng, max(80, n_people), (2, 3), taken)
    names: list[str] = []
    while len(names) < n_people:
        name = f"{rng.choice(given)} {rng.choice(family)}"
        if name not in names:
            names.append(name)
    seen_cities = [c.name for c in kb.cities if c.seen]
    people = [Person(f"heldout-person-{i:04d}", name, rng.randint(1650, 1990), rng.choice(seen_cities),
                     rng.choice(_OCCUPATIONS), "", False) for i, name in enumerate(names)]
    cities = [City(f"heldout-city-{i:04d}", name, rng.choice(kb.countries), rng.randint(800, 1850), "", False)
              for i, name in enumerate(city_names)]
    return [q for p in people for q in _person_questions(p)] + [q for c in cities for q in _city_questions(c)]


CRITIC_VALIDATION = 0.2  # share of the critic's entities held out to validate it and pick its threshold


def critic_questions(seed: int = SEED, size: FactsSpec = FactsSpec()) -> list[dict]:
    """The critic's data (HMST `--stage critic`): every question about the `qa_entities` (seen;
    the corpus answers them, so they are training-split questions that factqa never asks) and
    every `heldout_unseen` question, each with `split` "train" or "validation", decided per
    entity by its own seeded draw (`CRITIC_VALIDATION` of them validate)."""
    answered = qa_entities(seed, size)
    seen = [q for q in questions(seed, size) if q["id"].split(":")[0] in answered]
    out = []
    for q in seen + heldout_unseen(seed, size):
        entity = q["id"].split(":")[0]
        held = random.Random(f"{seed}:critic-split:{entity}").random() < CRITIC_VALIDATION
        out.append({**q, "split": "validation" if held else "train"})
    return out
