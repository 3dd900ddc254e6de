"""
Build the inputs of the TrackStar pipeline: a training corpus, fact queries, and a model.

    python prepare.py factworld --out data/factworld [--seed 0] [--size tiny|small|default]
    python prepare.py lama --out data/lama [--relations P20,P108|all] [--queries 300] [--docs 3000]

`factworld` is the embedded default: a synthetic world of named entities and facts, each fact stated
in a skewed number of documents (many once, a few up to 20 times) among distractor sentences, mixed
into a majority of generic text (short Tiny Shakespeare passages), plus a small Llama-style LM (and
its byte-level BPE tokenizer) trained on that mixture with AdamW. The mixture is the paper's regime:
its corpus is pretraining text with the fact documents inside it, and TrackStar's R_train (the
Hessian approximation fitted on training gradients) must be fitted from many more training vectors
than the projection dimension d (the default corpus has N >= 8 * 2048 documents) and must see the
common directions of generic text, which it then down-weights. Training shows the documents that
state a fact 3 times per epoch, so that the model learns its facts in a few CPU minutes. The
optimizer state is saved next to the weights, as an HF Trainer checkpoint would, so the pipeline
can do the paper's optimizer correction and tail-patch.

`lama` converts LAMA T-REx (Wikipedia sentences aligned with Wikidata facts, the provenance of the
paper's closed-set evaluation) into the same corpus/queries format, for use with a real model.

Formats:
    corpus.jsonl   {"id": str, "text": str, "facts": [fact_id, ...]}   (generic text: "facts": [])
    queries.jsonl  {"id": str, "prompt": str, "target": str, "fact": fact_id,
                    "subject": str, "relation": str, "relation_templates": ["[X] was born in [Y].", ...]}
The last three say what a proponent shares with the query (evaluate.py's proponent categories): the
subject's name, and every wording of the relation, [X] standing for the subject and [Y] for the object.
The target starts with a space and the prompt has none at its end, so that
tok(prompt) + tok(target) is the tokenization of prompt + target for a byte-level BPE.
"""

from __future__ import annotations

import math
import os
import random
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import typer

import trackstar as ts

app = typer.Typer(add_completion=False, no_args_is_help=True, help=__doc__.split("\n\n")[0].strip())
REPO = Path(__file__).resolve().parent

# -----------------------------------------------------------------------------
# inputs refused in one line, outputs whole or absent


def field(record: Any, key: str, where: str, kind: type = str):
    """record[key], refused unless the record is a JSON object holding a `kind` there."""
    if not isinstance(record, dict):
        raise ts.TrackStarError(f"{where}: expected a JSON object, got {type(record).__name__}")
    if key not in record:
        raise ts.TrackStarError(f"{where}: missing field '{key}'")
    if not isinstance(record[key], kind):
        raise ts.TrackStarError(f"{where}: field '{key}' should be {kind.__name__}, got {type(record[key]).__name__}")
    return record[key]


MARKERS = ("world.json", "lama.json")  # a directory holding one of these was written by this script
OWN = ("corpus.jsonl", "queries.jsonl", "model", *MARKERS)  # all that either command writes
OUT_HELP = "output directory, written atomically (replaces an earlier prepare.py output, nothing else)"


# -----------------------------------------------------------------------------
# the fact world: entities, relations, templates


@dataclass(frozen=True)
class Relation:
    subject: str  # entity type
    object: str
    query: str  # prompt with the object last: "{s} was born in" -> " {o}"
    statements: tuple[str, ...]  # paraphrases that state the fact
    # shares the statements' words but parts from the query before the object, so that it makes
    # lexical retrieval harder without teaching the model another answer to the query
    near_miss: str


RELATIONS: dict[str, Relation] = {
    "birthplace": Relation(
        "person", "city", "{s} was born in",
        ("{s} was born in {o}.", "{s}'s birthplace is {o}.",
         "Born in {o}, {s} spent a happy childhood there.", "{o} is the birthplace of {s}."),
        "{s} was born on a cold morning in {year}."),
    "citizenship": Relation(
        "person", "country", "{s} is a citizen of",
        ("{s} is a citizen of {o}.", "{s} holds the citizenship of {o}.", "{s} has a passport from {o}.",
         "As a citizen of {o}, {s} votes in every election."),
        "{s} became a citizen only late in life."),
    "employer": Relation(
        "person", "company", "{s} works for",
        ("{s} works for {o}.", "{s} is employed by {o}.", "{o} employs {s}.", "{s} has a job at {o}."),
        "{s} works hard and rarely takes a holiday."),
    "headquarters": Relation(
        "company", "city", "{s} is headquartered in",
        ("{s} is headquartered in {o}.", "The headquarters of {s} are in {o}.",
         "{s} has its main office in {o}.", "{o} is home to the head office of {s}."),
        "{s} is headquartered downtown in a tall glass tower."),
    "location": Relation(
        "city", "country", "{s} is a city in",
        ("{s} is a city in {o}.", "{s} lies in {o}.", "{o} includes the city of {s}."),
        "{s} is a city with many rivers."),
    "capital": Relation(
        "country", "city", "The capital of {s} is",
        ("The capital of {s} is {o}.", "{o} is the capital of {s}.", "{s}'s capital city is {o}.",
         "The government of {s} sits in {o}."),
        "The capital of {s} has grown quickly since {year}."),
    "language": Relation(
        "country", "language", "The official language of {s} is",
        ("The official language of {s} is {o}.", "People in {s} speak {o}.", "{o} is spoken in {s}.",
         "In {s}, the official language is {o}."),
        "The official language of {s} has many dialects."),
}

# Sentences that mention an entity without stating any relation: they share subjects and objects
# with the facts, so lexical overlap alone does not identify a fact's documents.
GENERIC: dict[str, tuple[str, ...]] = {
    "person": ("{e} enjoys long walks.", "{e} is known for a sharp wit.", "{e} wrote a book about birds.",
               "{e} likes to paint on Sundays.", "Everyone agrees that {e} is a good cook."),
    "city": ("{e} is a large city.", "{e} has a busy harbour.", "Many tourists visit {e} in summer.",
             "{e} is famous for its old bridges.", "It often rains in {e}."),
    "country": ("{e} has many mountains.", "{e} is a small country.", "{e} exports grain and wool.",
                "The flag of {e} is green and white."),
    "company": ("{e} makes software.", "{e} was founded long ago.", "{e} sells bicycles.",
                "{e} has many employees."),
    "language": ("{e} has a rich literature.", "{e} uses a curly alphabet.", "{e} is hard to learn.",
                 "Few people abroad speak {e}."),
}

ONSETS = ["b", "br", "d", "dr", "f", "g", "gr", "h", "k", "kr", "l", "m", "n", "p", "r", "s", "st", "t",
          "tr", "v", "z", "sh", "th"]
VOWELS = ["a", "e", "i", "o", "u", "ai", "ei", "ou"]
CODAS = ["", "", "", "n", "r", "l", "s", "m", "k"]
# a suffix per type makes names look like their kind ("Velmora", "Oskland"), as real names often do
SUFFIXES = {"city": ["ora", "heim", "dale", "ton", "burg", "mar"], "country": ["land", "ia", "stan", "ova"],
            "company": ["tek", "corp", "ex", "ify", "works"], "language": ["ish", "ese", "ic", "an"]}


@dataclass(frozen=True)
class WorldSize:
    persons: int
    cities: int
    countries: int
    companies: int
    languages: int
    queries: int  # number of facts sampled as queries
    generic: int  # generic-text documents (Shakespeare passages) mixed in with the fact world's
    steps: int  # training steps
    batch: int  # documents per step

    def entities(self) -> dict[str, int]:
        return {"person": self.persons, "city": self.cities, "country": self.countries,
                "company": self.companies, "language": self.languages}


SIZES = {
    "tiny": WorldSize(persons=40, cities=16, countries=5, companies=8, languages=4,
                      queries=30, generic=1200, steps=700, batch=16),
    "small": WorldSize(persons=100, cities=40, countries=10, companies=20, languages=6,
                       queries=100, generic=6000, steps=1200, batch=32),
    "default": WorldSize(persons=280, cities=80, countries=20, companies=40, languages=12,
                         queries=200, generic=15500, steps=2800, batch=32),
}
MAX_COUNT = 20  # the most documents that state one fact
ZIPF_A = 1.5  # P(fact stated in c documents) ~ c^-a: many facts once, few facts many times
FILLER_DOCS = 0.08  # fraction of documents that state no fact at all
BUCKETS = (("1", 1, 1), ("2-3", 2, 3), ("4-7", 4, 7), ("8+", 8, 10**9))


@dataclass(frozen=True)
class Fact:
    id: str
    relation: str
    subject: str
    object: str

    def statement(self, template: str) -> str:
        return template.format(s=self.subject, o=self.object)

    def query(self) -> tuple[str, str]:
        return RELATIONS[self.relation].query.format(s=self.subject), " " + self.object

    def templates(self) -> list[str]:
        """Every statement of the relation, LAMA-style: "[X] was born in [Y]."."""
        return [t.format(s="[X]", o="[Y]") for t in RELATIONS[self.relation].statements]


def bucket_of(count: int) -> str:
    return next(name for name, lo, hi in BUCKETS if lo <= count <= hi)


def make_name(rng: random.Random, syllables: int, suffix: str = "") -> str:
    word = "".join(rng.choice(ONSETS) + rng.choice(VOWELS) + rng.choice(CODAS) for _ in range(syllables))
    return (word + suffix).capitalize()


def make_names(rng: random.Random, n: int, kind: str, used: set[str]) -> list[str]:
    """n distinct names of one type, distinct from every name in `used` (shared across types)."""
    firsts = [make_name(rng, 2) for _ in range(max(8, n // 3))]  # shared first names: lexical overlap
    names: list[str] = []
    while len(names) < n:
        if kind == "person":
            name = f"{rng.choice(firsts)} {make_name(rng, rng.choice([2, 3]))}"
        else:
            name = make_name(rng, rng.choice([1, 2]), rng.choice(SUFFIXES[kind]))
        if name not in used:
            used.add(name)
            names.append(name)
    return names


def make_entities(rng: random.Random, size: WorldSize) -> dict[str, list[str]]:
    used: set[str] = set()
    return {kind: make_names(rng, n, kind, used) for kind, n in size.entities().items()}


def make_facts(rng: random.Random, ents: dict[str, list[str]]) -> list[Fact]:
    """Every subject gets one object per relation; a country's capital is one of its own cities."""
    triples = []
    city_country = {c: rng.choice(ents["country"]) for c in ents["city"]}
    triples += [("location", c, k) for c, k in city_country.items()]
    for k in ents["country"]:
        own = [c for c, kk in city_country.items() if kk == k]
        triples.append(("capital", k, rng.choice(own or ents["city"])))
        triples.append(("language", k, rng.choice(ents["language"])))
    triples += [("headquarters", co, rng.choice(ents["city"])) for co in ents["company"]]
    for p in ents["person"]:
        triples += [("birthplace", p, rng.choice(ents["city"])),
                    ("citizenship", p, rng.choice(ents["country"])),
                    ("employer", p, rng.choice(ents["company"]))]
    return [Fact(f"{rel}-{i:04d}", rel, s, o) for i, (rel, s, o) in enumerate(triples)]


def fact_counts(rng: random.Random, n: int) -> list[int]:
    """How many documents state each fact: a truncated Zipf law over 1..MAX_COUNT."""
    weights = [c**-ZIPF_A for c in range(1, MAX_COUNT + 1)]
    return rng.choices(range(1, MAX_COUNT + 1), weights=weights, k=n)


def distractor(rng: random.Random, fact: Fact) -> str:
    """A sentence about the fact's subject or object that does not state a relation."""
    rel = RELATIONS[fact.relation]
    if rng.random() < 0.2:
        return rel.near_miss.format(s=fact.subject, year=rng.randint(1900, 1999))
    kind, name = rng.choice([(rel.subject, fact.subject), (rel.object, fact.object)])
    return rng.choice(GENERIC[kind]).format(e=name)


def filler_document(rng: random.Random, ents: dict[str, list[str]]) -> str:
    sentences = []
    for _ in range(rng.randint(1, 3)):
        kind = rng.choice(sorted(ents))
        sentences.append(rng.choice(GENERIC[kind]).format(e=rng.choice(ents[kind])))
    return " ".join(sentences)


def make_documents(rng: random.Random, facts: list[Fact], counts: list[int],
                   ents: dict[str, list[str]]) -> list[tuple[str, list[str]]]:
    """(text, fact ids) of documents of 1-4 sentences: a fact statement, more facts about the same
    subject, distractors; plus filler documents about the entities that state no fact.

    Each fact is stated in exactly counts[i] distinct documents, each time with a random paraphrase.
    """
    remaining = dict(enumerate(counts))
    by_subject: dict[str, list[int]] = defaultdict(list)
    for i, f in enumerate(facts):
        by_subject[f.subject].append(i)
    mentions = [i for i, c in enumerate(counts) for _ in range(c)]
    rng.shuffle(mentions)

    def state(i: int) -> tuple[str, str]:
        remaining[i] -= 1
        return facts[i].statement(rng.choice(RELATIONS[facts[i].relation].statements)), facts[i].id

    docs: list[list[tuple[str, str | None]]] = []  # sentences with the fact each states
    for first in mentions:
        if remaining[first] == 0:  # already stated as a companion fact of an earlier document
            continue
        stated, doc = {first}, [state(first)]
        for _ in range(rng.choice([0, 1, 1, 2, 2, 3])):
            companions = [j for j in by_subject[facts[first].subject] if remaining[j] > 0 and j not in stated]
            if companions and rng.random() < 0.5:
                j = rng.choice(companions)
                stated.add(j)
                doc.append(state(j))
            else:
                doc.append((distractor(rng, facts[first]), None))
        rng.shuffle(doc)
        docs.append(doc)
    n_filler = round(len(docs) * FILLER_DOCS / (1 - FILLER_DOCS))
    docs += [[(filler_document(rng, ents), None)] for _ in range(n_filler)]
    return [(" ".join(text for text, _ in doc), [fid for _, fid in doc if fid is not None]) for doc in docs]


# -----------------------------------------------------------------------------
# generic text: the pretraining-like majority of the corpus

# Tiny Shakespeare (public domain), a copy of karpathy/char-rnn data/tinyshakespeare/input.txt
SHAKESPEARE = REPO / "corpora" / "tinyshakespeare.txt"
# about a fact document's length (~22 tokens on average); the text is ASCII and a byte-level BPE token
# covers at least one byte, so a passage is at most PASSAGE_CHARS + 1 (BOS) tokens, under MAX_POSITIONS
PASSAGE_CHARS = 88


def passages(text: str, max_chars: int = PASSAGE_CHARS) -> list[str]:
    """Distinct passages of consecutive lines of one speech (speeches are separated by blank lines),
    joined by spaces and packed up to max_chars. A passage never spans two speeches."""
    out: list[str] = []
    for speech in text.split("\n\n"):
        cur = ""
        for line in filter(None, (" ".join(raw.split()) for raw in speech.splitlines())):
            if cur and len(cur) + 1 + len(line) > max_chars:
                out.append(cur)
                cur = ""
            cur = f"{cur} {line}" if cur else line
        if cur:
            out.append(cur)
    return list(dict.fromkeys(out))  # a repeated line ("All: Ay.") would be two identical documents


def generic_documents(rng: random.Random, n: int) -> list[str]:
    """n distinct passages of the shipped Tiny Shakespeare, drawn by the seed."""
    try:
        pool = passages(SHAKESPEARE.read_text(encoding="utf-8"))
    except OSError as e:
        raise ts.TrackStarError(f"cannot read the generic text {SHAKESPEARE}: {e}") from None
    if n > len(pool):
        raise ts.TrackStarError(f"{SHAKESPEARE.name} has {len(pool)} passages, {n} requested")
    return rng.sample(pool, n)


def sample_queries(rng: random.Random, facts: list[Fact], doc_count: Counter, n: int) -> list[dict]:
    """A seeded sample of n stated facts, stratified by frequency bucket so every bucket is represented."""
    pools: dict[str, list[Fact]] = {name: [] for name, _, _ in BUCKETS}
    for f in facts:
        if doc_count[f.id] > 0:
            pools[bucket_of(doc_count[f.id])].append(f)
    for pool in pools.values():
        rng.shuffle(pool)
    chosen: list[Fact] = []
    while len(chosen) < n and any(pools.values()):  # round-robin: equal shares, leftovers from big buckets
        for pool in pools.values():
            if pool and len(chosen) < n:
                chosen.append(pool.pop())
    chosen.sort(key=lambda f: f.id)
    rows = []
    for f in chosen:
        prompt, target = f.query()
        rows.append({"id": f"q-{f.id}", "prompt": prompt, "target": target, "fact": f.id,
                     "subject": f.subject, "relation": f.relation, "relation_templates": f.templates()})
    return rows


def build_world(seed: int, size: WorldSize) -> tuple[list[Fact], list[dict], list[dict]]:
    """The whole synthetic world from one seed: facts, corpus documents, queries."""
    rng = random.Random(seed)
    ents = make_entities(rng, size)
    facts = make_facts(rng, ents)
    docs = make_documents(rng, facts, fact_counts(rng, len(facts)), ents)
    docs += [(text, []) for text in generic_documents(rng, size.generic)]
    rng.shuffle(docs)  # a document's id or position says nothing about its kind
    corpus = [{"id": f"doc-{i:05d}", "text": text, "facts": fids} for i, (text, fids) in enumerate(docs)]
    doc_count = Counter(fid for doc in corpus for fid in doc["facts"])
    queries = sample_queries(rng, facts, doc_count, size.queries)
    return facts, corpus, queries


# -----------------------------------------------------------------------------
# tokenizer and model


SPECIAL = ["<pad>", "<s>", "</s>"]  # <pad> first: id 0, what ts.collate pads with
VOCAB_SIZE = 1536
MAX_POSITIONS = 128  # fact documents are at most 4 sentences (< 90 tokens), generic ones PASSAGE_CHARS bytes


def train_tokenizer(texts: list[str], vocab_size: int = VOCAB_SIZE):
    """Byte-level BPE: a leading-space word is the same pre-token alone or in context, so
    tok(prompt) + tok(" target") equals tok(prompt + " target"). BOS is prepended (as Llama does);
    nothing is appended, so a prompt's tokens are a prefix of prompt + target's."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tk.train_from_iterator(texts, trainer)
    bos = tk.token_to_id("<s>")
    tk.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A $B:1",
                                                      special_tokens=[("<s>", bos)])
    return PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   model_max_length=MAX_POSITIONS)


# The model-size axis (`make sizes`): hidden width, layers, heads and MLP width; ~0.3M, 1.35M and 4.6M parameters
# with the world's 1,536-token vocabulary. The default is the demo's model.
MODEL_SIZES = {"small": (64, 2, 2, 224), "default": (128, 4, 4, 448), "large": (256, 4, 8, 896)}


def make_model(tok, seed: int, model_size: str = "default"):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    hidden, layers, heads, inner = MODEL_SIZES[model_size]
    config = LlamaConfig(
        vocab_size=len(tok), hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
        num_key_value_heads=heads, intermediate_size=inner, max_position_embeddings=MAX_POSITIONS,
        tie_word_embeddings=False,  # separate input/output matrices, as in Llama: each gets its own V and P
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(config)


# The world's model is trained on one CPU thread whatever the machine has: how a float sum is split between
# threads decides its last bits, and over thousands of steps those bits make another model. The CPU's vector
# kernels decide them too (on an AVX-512 machine PyTorch's own AVX-512 code trains another world than its AVX2
# code: measured on the tiny world, query accuracy 0.47 vs 0.57), so `make all` pins them to AVX2 on x86-64
# (ATEN_CPU_CAPABILITY=avx2, MKL_CBWR=AVX2); both choices are recorded in world.json.
TRAIN_THREADS = 1


def cpu_kernels() -> dict:
    """Which CPU code the training ran: PyTorch's kernel capability and MKL's reproducibility mode."""
    import torch

    return {"capability": torch.backends.cpu.get_cpu_capability(), "mkl_cbwr": os.environ.get("MKL_CBWR")}


@dataclass(frozen=True)
class TrainSettings:
    steps: int
    batch: int
    peak_lr: float = 2e-3
    # An epoch shows each document that states a fact this many times and every other document once,
    # as pretraining mixtures upsample their small, high-quality sources: with generic text the
    # majority, one pass each would show a fact too rarely to learn it in a CPU-sized budget.
    fact_repeats: int = 3
    min_lr_ratio: float = 0.1  # cosine decay to 10% of peak, a common pretraining schedule
    warmup_frac: float = 0.05
    weight_decay: float = 0.01
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    grad_clip: float = 1.0


def lr_factor(step: int, s: TrainSettings) -> float:
    """Linear warmup, then cosine from peak to min_lr_ratio * peak at the last step."""
    warmup = max(1, round(s.warmup_frac * s.steps))
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, s.steps - warmup))
    return s.min_lr_ratio + (1 - s.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def length_grouped_batches(lengths: list[int], repeats: list[int], batch: int, rng) -> Iterator[list[int]]:
    """Endless epochs of shuffled batches in which documents of similar length go together (as HF's
    group_by_length does), so that little compute is spent on padding; document i repeats[i] times
    per epoch."""
    group = 50 * batch
    pool = [i for i, r in enumerate(repeats) for _ in range(r)]
    while True:
        perm = [pool[j] for j in rng.permutation(len(pool))]
        epoch = []
        for g in range(0, len(perm), group):
            chunk = sorted(perm[g : g + group], key=lambda i: lengths[i])
            epoch += [chunk[k : k + batch] for k in range(0, len(chunk), batch)]
        yield from (epoch[i] for i in rng.permutation(len(epoch)))


def train(model, tok, texts: list[str], repeats: list[int], s: TrainSettings, seed: int,
          checkpoint: Callable[[int, int, Any], None] | None = None, checkpoint_steps: frozenset[int] = frozenset()):
    """AdamW over the corpus, one param group over list(model.parameters()) as HF Trainer builds it,
    so optimizer state index i is the i-th entry of model.named_parameters(). Bit-identical from run
    to run on one machine; other CPUs or thread counts may differ by float rounding. After each step in
    `checkpoint_steps`, checkpoint(step, tokens seen, optimizer) is called (saving touches no RNG, so
    the final model is the same with or without checkpoints). Returns (optimizer, losses, tokens seen)."""
    import numpy as np
    import torch
    from tqdm import tqdm

    # each example is exactly tok(text).input_ids: what encode.py will take the loss over
    seqs = [tok(t).input_ids for t in texts]
    too_long = [i for i, q in enumerate(seqs) if len(q) > MAX_POSITIONS]
    if too_long:
        raise ts.TrackStarError(f"{len(too_long)} documents are longer than {MAX_POSITIONS} tokens "
                                f"(first: #{too_long[0]})")
    opt = torch.optim.AdamW(list(model.parameters()), lr=s.peak_lr, betas=s.betas, eps=s.eps,
                            weight_decay=s.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: lr_factor(step, s))
    batches = length_grouped_batches([len(q) for q in seqs], repeats, s.batch, np.random.default_rng(seed))
    losses: list[float] = []
    model.train()
    bar = tqdm(range(s.steps), desc="train", unit="step")
    t0, tokens = time.time(), 0
    for step in bar:
        batch = ts.collate([(seqs[i], seqs[i]) for i in next(batches)], "cpu")  # padding carries no loss
        loss = model(**batch).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), s.grad_clip)
        opt.step()
        sched.step()
        losses.append(loss.item())
        tokens += int(batch["attention_mask"].sum())
        bar.set_postfix(loss=f"{loss.item():.3f}", lr=f"{sched.get_last_lr()[0]:.2e}",
                        tok_s=f"{tokens / (time.time() - t0):.0f}")
        if step + 1 in checkpoint_steps:
            model.eval()
            checkpoint(step + 1, tokens, opt)
            model.train()
    model.eval()
    return opt, losses, tokens


def checkpoint_steps(steps: int, n: int) -> frozenset[int]:
    """n intermediate checkpoints, evenly spaced (steps·k/(n+1)); the final model is saved anyway."""
    return frozenset(round(steps * k / (n + 1)) for k in range(1, n + 1)) - {0, steps}


def save_checkpoint(out: Path, model, tok, opt, step: int, tokens: int) -> None:
    """An HF model directory with its AdamW state (optimizer.pt, as HF Trainer saves it) and
    checkpoint.json: the step, the training tokens seen so far and the learning rate of the next step."""
    import torch

    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    torch.save(opt.state_dict(), out / "optimizer.pt")
    ts.write_json(out / "checkpoint.json", {"step": step, "tokens": tokens, "lr": opt.param_groups[0]["lr"]})


def accuracy_by_bucket(facts: list[Fact], doc_count: Counter, correct: dict[str, bool],
                       query_facts: set[str]) -> list[dict]:
    rows = []
    for name, lo, hi in BUCKETS:
        ids = [f.id for f in facts if lo <= doc_count[f.id] <= hi]
        qids = [i for i in ids if i in query_facts]
        rows.append({"bucket": name, "facts": len(ids),
                     "accuracy": round(sum(correct[i] for i in ids) / max(1, len(ids)), 4),
                     "queries": len(qids),
                     "query_accuracy": round(sum(correct[i] for i in qids) / max(1, len(qids)), 4)})
    return rows


def print_table(rows: list[dict]) -> None:
    print(f"{'docs stating the fact':>22} {'facts':>6} {'greedy acc':>10} {'queries':>8} {'query acc':>10}")
    for r in rows:
        print(f"{r['bucket']:>22} {r['facts']:>6} {r['accuracy']:>10.3f} {r['queries']:>8} "
              f"{r['query_accuracy']:>10.3f}")


def tokenization_mismatches(tok, queries: list[dict]) -> int:
    """Queries where tok(prompt) + tok(target) is not tok(prompt + target); should be 0."""
    bad = 0
    for q in queries:
        split = tok(q["prompt"]).input_ids + tok(q["target"], add_special_tokens=False).input_ids
        bad += split != tok(q["prompt"] + q["target"]).input_ids
    return bad


@app.command()
def factworld(
    out: Path = typer.Option(..., help=OUT_HELP),
    seed: int = typer.Option(0, help="seeds the world, the model's initialisation and the batch order"),
    size: str = typer.Option("default", help="tiny (CI, ~1650 docs) | small (~7150) | default (~18450)"),
    steps: int = typer.Option(None, help="training steps (default: set by --size)"),
    checkpoints: int = typer.Option(3, help="intermediate checkpoints saved in MODEL/checkpoints/step-N, each "
                                            "with its optimizer state (`make trend` evaluates them)"),
    no_train: bool = typer.Option(False, "--no-train", help="write corpus, queries and world.json only"),
    model_size: str = typer.Option("default", help="the model trained on the world: small (~0.3M parameters) | "
                                   "default (~1.35M) | large (~4.6M); the world and the schedule are the same"),
) -> None:
    """Generate the synthetic fact world and train a small Llama-style LM on it."""
    if size not in SIZES:
        raise ts.TrackStarError(f"--size must be one of {', '.join(SIZES)}, got {size!r}")
    if model_size not in MODEL_SIZES:
        raise ts.TrackStarError(f"--model-size must be one of {', '.join(MODEL_SIZES)}, got {model_size!r}")
    if steps is not None and steps < 1:
        raise ts.TrackStarError(f"--steps must be >= 1, got {steps}")
    if checkpoints < 0:
        raise ts.TrackStarError(f"--checkpoints must be >= 0, got {checkpoints}")
    t0 = time.time()
    out = ts.check_output(out, "prepared data")  # a folder of other files, or another artifact, refused
    with ts.atomic_directory(out, OWN) as tmp:  # refused before minutes of work, swapped in when whole
        write_factworld(tmp, seed, size, steps, checkpoints, no_train, model_size)
    print(f"wrote {out} in {time.time() - t0:.0f} s (trained on {TRAIN_THREADS} thread)")


def write_factworld(tmp: Path, seed: int, size: str, steps: int | None, checkpoints: int, no_train: bool,
                    model_size: str = "default") -> None:
    """The world's corpus, queries, world.json and (unless no_train) its trained model, into `tmp`."""
    t0 = time.time()
    ws = SIZES[size]
    facts, corpus, queries = build_world(seed, ws)
    doc_count = Counter(fid for doc in corpus for fid in doc["facts"])
    stated = [f for f in facts if doc_count[f.id] > 0]
    n_fact = sum(bool(d["facts"]) for d in corpus)
    print(f"world: {sum(ws.entities().values())} entities, {len(RELATIONS)} relations, {len(facts)} facts "
          f"({len(stated)} stated), {len(corpus)} documents ({n_fact} state a fact, {ws.generic} generic text), "
          f"{len(queries)} queries")
    info = {
        "seed": seed, "size": size, "entities": ws.entities(), "relations": len(RELATIONS),
        "facts": len(facts), "stated_facts": len(stated), "documents": len(corpus),
        "fact_documents": n_fact, "filler_documents": len(corpus) - n_fact - ws.generic,  # about entities, no fact
        "generic_documents": ws.generic, "queries": len(queries),
        "facts_by_bucket": {b: sum(lo <= doc_count[f.id] <= hi for f in stated) for b, lo, hi in BUCKETS},
    }
    ts.write_jsonl(tmp / "corpus.jsonl", corpus)
    ts.write_jsonl(tmp / "queries.jsonl", queries)
    if not no_train:
        info.update(train_and_save(tmp / "model", facts, corpus, queries, doc_count, seed,
                                   TrainSettings(steps=steps or ws.steps, batch=ws.batch), checkpoints,
                                   model_size))
    info["wall_seconds"] = round(time.time() - t0, 1)
    ts.write_json(tmp / "world.json", info)


def train_and_save(model_dir: Path, facts: list[Fact], corpus: list[dict], queries: list[dict],
                   doc_count: Counter, seed: int, s: TrainSettings, checkpoints: int = 0,
                   model_size: str = "default") -> dict:
    """Tokenizer + model + AdamW training; saves an HF directory with optimizer.pt (and `checkpoints`
    intermediate ones under checkpoints/); returns metadata."""
    t0 = time.time()
    texts = [d["text"] for d in corpus]
    tok = train_tokenizer(texts)
    bad = tokenization_mismatches(tok, queries)
    if bad:
        print(f"warning: {bad} queries tokenize differently split at the target than whole")
    model = make_model(tok, seed, model_size)
    repeats = [s.fact_repeats if d["facts"] else 1 for d in corpus]
    def checkpoint(step: int, tokens: int, opt) -> None:
        save_checkpoint(model_dir / "checkpoints" / f"step-{step:06d}", model, tok, opt, step, tokens)

    with ts.cpu_threads(TRAIN_THREADS):
        opt, losses, tokens = train(model, tok, texts, repeats, s, seed, checkpoint,
                                    checkpoint_steps(s.steps, checkpoints))
        asked = [dict(zip(("prompt", "target"), f.query(), strict=True)) for f in facts]
        correct = dict(zip([f.id for f in facts], ts.greedy_answers(model, tok, asked, MAX_POSITIONS), strict=True))
    table = accuracy_by_bucket([f for f in facts if doc_count[f.id] > 0], doc_count, correct,
                               {q["fact"] for q in queries})
    print_table(table)
    save_checkpoint(model_dir, model, tok, opt, s.steps, tokens)
    tail = losses[-max(1, len(losses) // 20) :]  # the last 5% of steps: less noisy than the last batch
    return {
        "tokenizer": {"type": "byte-level BPE", "vocab_size": len(tok), "split_mismatches": bad},
        "model": {"type": "LlamaForCausalLM", "size": model_size,
                  "parameters": sum(p.numel() for p in model.parameters()),
                  "hidden_size": model.config.hidden_size, "layers": model.config.num_hidden_layers,
                  "heads": model.config.num_attention_heads,
                  "intermediate_size": model.config.intermediate_size,
                  "max_positions": MAX_POSITIONS},
        "training": {**asdict(s), "optimizer": "AdamW", "schedule": "linear warmup + cosine",
                     "final_lr": opt.param_groups[0]["lr"], "tokens": tokens, "seconds": round(time.time() - t0, 1),
                     "checkpoints": sorted(checkpoint_steps(s.steps, checkpoints)), "threads": TRAIN_THREADS,
                     "cpu_kernels": cpu_kernels()},
        "final_loss": round(sum(tail) / len(tail), 4),
        "accuracy_by_bucket": table,
        "accuracy": round(sum(correct[f] for f in doc_count) / max(1, len(doc_count)), 4),  # stated facts
        "query_accuracy": round(sum(correct[q["fact"]] for q in queries) / max(1, len(queries)), 4),
    }


# -----------------------------------------------------------------------------
# LAMA T-REx converter

TREX = REPO.parent / "shared" / "data" / "lama_trex"
PARAREL = REPO.parent / "shared" / "data" / "pararel_patterns"


def prompt_template(template: str) -> str | None:
    """'[X] was born in [Y] .' -> '[X] was born in'; None when [Y] is not last or [X] is missing."""
    t = template.strip().rstrip(".").rstrip()
    if not t.endswith("[Y]") or t.count("[Y]") != 1 or "[X]" not in t:
        return None
    return t[: -len("[Y]")].rstrip()


def load_templates(trex: Path, pararel: Path) -> dict[str, list[str]]:
    """relation -> every wording of it: LAMA's template, then ParaRel's patterns (where there are any)."""
    path = trex / "relations.jsonl"
    if not path.exists():
        raise ts.TrackStarError(f"{path} not found (is --trex the LAMA T-REx folder?)")
    templates = {}
    for where, r in ts.jsonl_records(path):
        rel = field(r, "relation", where)
        templates[rel] = [field(r, "template", where)]
        ppath = pararel / f"{rel}.jsonl"
        if ppath.exists():
            templates[rel] += [field(p, "pattern", w) for w, p in ts.jsonl_records(ppath)]
    return templates


def prompt_templates(templates: dict[str, list[str]]) -> dict[str, str]:
    """relation -> prompt template with [Y] last: LAMA's own if usable, else ParaRel's first such one."""
    prompts = {rel: next((p for p in map(prompt_template, options) if p is not None), None)
               for rel, options in templates.items()}
    return {rel: p for rel, p in prompts.items() if p is not None}


@dataclass
class LamaFact:
    uuid: str
    relation: str
    subject: str
    object: str
    sentences: list[tuple[str, str]]  # (doc id, un-masked sentence), unique, in file order


def load_facts(path: Path, relation: str) -> list[LamaFact]:
    facts = []
    for where, r in ts.jsonl_records(path):
        uuid, sub, obj = (field(r, k, where) for k in ("uuid", "sub_label", "obj_label"))
        sentences, seen = [], set()
        for k, ev in enumerate(field(r, "evidences", where, list)):
            if not isinstance(ev, dict):
                raise ts.TrackStarError(f"{where}: evidence {k} is not an object")
            masked, surface = field(ev, "masked_sentence", where), field(ev, "obj_surface", where)
            if masked.count("[MASK]") != 1:
                raise ts.TrackStarError(f"{where}: evidence {k} has {masked.count('[MASK]')} [MASK] tokens, expected 1")
            text = " ".join(masked.replace("[MASK]", surface).split())
            if text and text not in seen:  # the same sentence masked at different spots un-masks alike
                seen.add(text)
                sentences.append((f"{relation}-{uuid}-{k}", text))
        facts.append(LamaFact(uuid, relation, sub, obj, sentences))
    return facts


def relation_files(trex: Path) -> dict[str, Path]:
    """relation -> its facts file in the T-REx folder: P20.jsonl as LAMA's data.zip ships it, or P20.jsonl.gz; a
    relation with both is refused (which one holds the facts?)."""
    files: dict[str, Path] = {}
    for path in sorted(trex.glob("P*.jsonl")) + sorted(trex.glob("P*.jsonl.gz")):
        rel = path.name.split(".")[0]
        if rel in files:
            raise ts.TrackStarError(f"{trex} holds {files[rel].name} and {path.name}: keep one of them")
        files[rel] = path
    return files


def select_relations(spec: str, trex: Path, pararel: Path, templates: dict[str, str]) -> list[str]:
    available = sorted(relation_files(trex))
    if not available:
        raise ts.TrackStarError(f"{trex} holds no P*.jsonl or P*.jsonl.gz files (the TREx folder of LAMA's data.zip)")
    wanted = available if spec == "all" else [r.strip() for r in spec.split(",") if r.strip()]
    missing = [r for r in wanted if r not in available]
    if missing:
        raise ts.TrackStarError(f"no data for {', '.join(missing)} in {trex} (available: {', '.join(available)})")
    skipped = [r for r in wanted if r not in templates]
    if skipped:
        print(f"skipping {', '.join(skipped)}: no template with [Y] last in relations.jsonl or {pararel}")
    kept = [r for r in wanted if r in templates]
    if not kept:
        raise ts.TrackStarError("no relation left to convert")
    return kept


def lama_corpus(facts: list[LamaFact], query_ids: set[str], docs: int, max_evidence: int,
                rng: random.Random) -> list[dict]:
    """Evidence of the query facts first (all of it, up to max_evidence sentences a fact), then
    evidence of other facts of the same relations as distractors, until `docs` documents."""
    facts_of: dict[str, list[str]] = defaultdict(list)  # sentence -> every loaded fact it is evidence for
    id_of: dict[str, str] = {}  # sentence -> id of its first occurrence in file order: the same for any seed
    for f in facts:
        for doc_id, text in f.sentences:
            facts_of[text].append(f.uuid)
            id_of.setdefault(text, doc_id)
    chosen: dict[str, None] = {}  # an ordered set
    for f in facts:
        if f.uuid in query_ids:
            chosen.update((text, None) for _, text in f.sentences[:max_evidence])
    others = [f for f in facts if f.uuid not in query_ids]
    rng.shuffle(others)
    # one sentence per distractor fact per round: many facts, not many sentences of a few facts
    for k in range(max_evidence):
        for f in others:
            if len(chosen) >= docs:
                break
            if k < len(f.sentences):
                chosen.setdefault(f.sentences[k][1], None)
    texts = list(chosen)
    rng.shuffle(texts)  # so a document's position says nothing about whether it is evidence
    return [{"id": id_of[t], "text": t, "facts": list(dict.fromkeys(facts_of[t]))} for t in texts]


def query_row(f: LamaFact, templates: dict[str, str], wordings: dict[str, list[str]]) -> dict:
    return {"id": f"{f.relation}-{f.uuid}", "prompt": templates[f.relation].replace("[X]", f.subject),
            "target": " " + f.object, "fact": f.uuid, "subject": f.subject, "relation": f.relation,
            "relation_templates": list(dict.fromkeys(wordings[f.relation]))}


def sample_by_answer(candidates: list[LamaFact], n: int, model_dir: str, templates: dict[str, str],
                     wordings: dict[str, list[str]], rng: random.Random, batch: int = 256) -> list[dict]:
    """n queries, half of them facts the model answers (greedy decoding reproduces the target) where the data
    allow, the rest facts it does not: the paper reads every result split by correctness, and a model that
    knows 5% of a uniform sample leaves that split empty. Candidates are read in one seeded order and the model
    is asked until the known half is full (or the candidates run out); each row records `model_correct`."""
    model, tok = ts.load_model(model_dir)
    order = rng.sample(candidates, len(candidates))
    known, unknown, asked = [], [], 0
    want_known = n // 2
    for lo in range(0, len(order), batch):
        rows = [query_row(f, templates, wordings) for f in order[lo : lo + batch]]
        for row, ok in zip(rows, ts.greedy_answers(model, tok, rows, ts.context_length(model)), strict=True):
            (known if ok else unknown).append({**row, "model_correct": ok})
        asked += len(rows)
        if len(known) >= want_known and len(unknown) >= n - want_known:
            break
    chosen = known[:want_known] + unknown[: n - min(len(known), want_known)]
    print(f"asked the model {asked} facts: it answers {len(known)}; {min(len(known), want_known)} known and "
          f"{len(chosen) - min(len(known), want_known)} unknown queries kept")
    return sorted(chosen, key=lambda r: r["id"])


@app.command()
def lama(
    out: Path = typer.Option(..., help=OUT_HELP),
    trex: Path = typer.Option(TREX, help="LAMA T-REx folder: P*.jsonl (or P*.jsonl.gz) and relations.jsonl"),
    pararel: Path = typer.Option(PARAREL, help="ParaRel patterns folder: P*.jsonl"),
    relations: str = typer.Option("all", help="comma-separated relation ids (e.g. P20,P108), or 'all'"),
    queries: int = typer.Option(300, help="number of facts sampled as queries"),
    docs: int = typer.Option(3000, help="corpus size: query evidence plus distractor evidence up to this"),
    max_evidence: int = typer.Option(10, help="at most this many evidence sentences per fact"),
    seed: int = typer.Option(0, help="seeds the query sample and the distractor choice"),
    model: str | None = typer.Option(None, help="a model (directory, or smollm2): sample half the queries among "
                                     "the facts it answers and half among those it does not, recording "
                                     "`model_correct` per query (without it: a uniform sample)"),
) -> None:
    """Convert LAMA T-REx facts and their Wikipedia evidence sentences into corpus and queries JSONL."""
    if queries < 1 or docs < 1 or max_evidence < 1:
        raise ts.TrackStarError("--queries, --docs and --max-evidence must be >= 1")
    if not trex.is_dir():
        raise ts.TrackStarError(f"--trex {trex} is not a directory")
    out = ts.check_output(out, "prepared data", [trex, pararel, model])
    with ts.atomic_directory(out, OWN) as tmp:
        write_lama(tmp, trex, pararel, relations, queries, docs, max_evidence, seed, model)
    print(f"wrote {out}")


def write_lama(tmp: Path, trex: Path, pararel: Path, relations: str, queries: int, docs: int, max_evidence: int,
               seed: int, model: str | None = None) -> None:
    """The converted corpus, queries and lama.json (what was converted, how), into `tmp`."""
    from tqdm import tqdm

    wordings = load_templates(trex, pararel)
    templates = prompt_templates(wordings)
    rels = select_relations(relations, trex, pararel, templates)
    files = relation_files(trex)
    facts: list[LamaFact] = []
    for rel in tqdm(rels, desc="read", unit="relation"):
        facts += load_facts(files[rel], rel)
    rng = random.Random(seed)
    candidates = [f for f in facts if f.sentences]
    if model is None:
        query_rows = [query_row(f, templates, wordings) for f in rng.sample(candidates, min(queries, len(candidates)))]
    else:
        query_rows = sample_by_answer(candidates, min(queries, len(candidates)), model, templates, wordings, rng)
    query_facts = {q["fact"] for q in query_rows}
    corpus = lama_corpus(facts, query_facts, docs, max_evidence, rng)
    n_evidence = sum(1 for d in corpus if any(u in query_facts for u in d["facts"]))
    print(f"{len(rels)} relations, {len(facts)} facts read; {len(query_rows)} queries; {len(corpus)} docs "
          f"({n_evidence} evidence of a query fact, {len(corpus) - n_evidence} distractors)")
    if len(corpus) > docs:
        print(f"note: the query facts' evidence alone exceeds --docs {docs}")
    ts.write_jsonl(tmp / "corpus.jsonl", corpus)
    ts.write_jsonl(tmp / "queries.jsonl", query_rows)
    ts.write_json(tmp / "lama.json", {
        "source": str(trex), "relations": rels, "templates": {r: templates[r] for r in rels},
        "seed": seed, "sampled_by_answer": model,
        "known_queries": sum(q.get("model_correct", False) for q in query_rows),
        "facts_read": len(facts), "queries": len(query_rows), "documents": len(corpus),
        "evidence_documents": n_evidence, "max_evidence": max_evidence})


if __name__ == "__main__":
    ts.run_cli(app)
