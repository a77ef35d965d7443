"""Generate the bundled tunewiz demo dataset (company-headline sentiment).

Writes two chat-format JSONL files under presets/datasets/demo/:

  train.jsonl    320 examples (160 positive / 160 negative)
  heldout.jsonl   40 examples ( 20 positive /  20 negative)

Each example asks whether a news headline affects a company positively or
negatively; the assistant answers with exactly one word, "positive" or
"negative". The held-out file is built from headline templates, company
names and analyst-firm names that never appear in train, so held-out
accuracy measures generalisation rather than memorisation. All names are
fictional. Output is fully deterministic for a given seed.

Usage:  python tools/make_demo_data.py [--seed 1234] [--out-dir DIR]
Python 3.11+, standard library only.
"""

from __future__ import annotations

import argparse
import json
import random
import re
from collections import Counter
from pathlib import Path

SEED = 1234
N_TRAIN = 320
N_HELDOUT = 40
MIN_WORDS, MAX_WORDS = 6, 18

PROMPT = (
    "Headline: {headline}\n"
    "Does this headline affect {company} positively or negatively? "
    "Answer with one word: positive or negative."
)

# Placeholders:
#   {c}  company          {p}  percentage (e.g. 17%)   {q}  quarter
#   {m}  $ millions       {b}  $ billions              {pt} price target
#   {n}  large count      {k}  small count             {j}  job count
#   {firm} analyst firm

TRAIN_POSITIVE = [
    "{c} beats {q} earnings estimates as revenue jumps {p}",
    "{c} raises full-year guidance after strong {q} sales",
    "{c} shares surge after {firm} upgrades stock to buy",
    "{c} wins {m} multi-year government contract",
    "{c} reports record quarterly profit, up {p} from last year",
    "{c} announces {b} share buyback program",
    "{c} lands multi-year supply deal with major European automaker",
    "Regulators approve {c} flagship product ahead of schedule",
    "{c} stock climbs {p} on better-than-expected customer growth",
    "{c} boosts quarterly dividend by {p}",
    "{c} wins patent lawsuit against rival, awarded {m} in damages",
    "{firm} raises {c} price target to {pt}, citing strong demand",
    "{c} unveils new product line to rave early reviews",
    "{c} signs strategic partnership with leading cloud provider",
    "{c} cuts debt by {m} ahead of schedule",
    "{c} margins widen as cost-cutting plan pays off",
    "{c} secures {m} in new funding from top investors",
    "{c} named preferred supplier by national rail operator",
    "{c} posts {p} jump in online sales during holiday season",
    "Demand for {c} new products outpaces supply as backlog hits record",
    "{c} hires respected industry veteran as CEO, shares rise {p}",
    "{c} order book swells {p} as new contracts pour in",
    "{c} clears regulatory review for {b} acquisition",
    "{c} credit rating upgraded by major ratings agency",
    "{c} to open {k} new locations after strong first half",
    "{c} revenue tops forecasts for fifth straight quarter",
    "{c} shares hit all-time high after blowout {q} results",
    "{c} wins regulatory approval to enter {k} new markets",
    "{c} digital unit revenue doubles year over year",
    "{c} returns to profitability a year earlier than expected",
    "{c} lifts annual sales outlook on strong consumer demand",
    "Investors cheer as {c} beats profit forecast by wide margin",
    "{c} lands exclusive distribution deal with national retail chain",
    "{c} cleared of wrongdoing in federal antitrust probe",
    "{c} to hire {j} engineers as orders climb",
    "{c} sells {n} units of new flagship product in first month",
]

TRAIN_NEGATIVE = [
    "{c} misses {q} earnings estimates as sales slump {p}",
    "{c} cuts full-year guidance, citing weak demand",
    "{c} shares tumble after {firm} downgrades stock to sell",
    "{c} loses {m} defense contract to rival bidder",
    "{c} to lay off {j} workers amid restructuring",
    "{c} recalls {n} products over safety defect",
    "{c} hit with {m} fine over safety violations",
    "{c} CEO resigns abruptly amid accounting probe",
    "{c} discloses data breach affecting {n} customer accounts",
    "{c} sued by shareholders over misleading revenue claims",
    "{firm} slashes {c} price target to {pt} on margin worries",
    "{c} suspends dividend as cash reserves dwindle",
    "{c} posts surprise {q} loss, shares sink {p}",
    "Regulators block {c} flagship product over safety concerns",
    "{c} warns supply shortages will hit next quarter sales",
    "{c} credit rating cut to junk by major ratings agency",
    "{c} scraps planned merger after regulators raise objections",
    "{c} factory fire halts production for several weeks",
    "Key customer ends partnership with {c}, citing quality concerns",
    "{c} faces federal investigation into pricing practices",
    "{c} stock plunges {p} after weak customer numbers",
    "{c} delays product launch again amid software problems",
    "{c} writes down {m} on failed acquisition",
    "{c} loses patent case, ordered to pay {m} to competitor",
    "{c} revenue falls short of forecasts for third straight quarter",
    "{c} to close {k} facilities as demand weakens",
    "{c} chief financial officer departs amid internal review",
    "Workers at {c} plants vote to strike over pay dispute",
    "{c} margins shrink as raw material costs soar",
    "{c} misses debt payment, raising bankruptcy fears",
    "{c} shares hit multi-year low after disappointing {q} results",
    "{c} pulls annual outlook amid falling orders",
    "{c} hit by ransomware attack, systems offline for days",
    "{c} product linked to dozens of injuries as lawsuits mount",
    "Auditor raises going-concern doubts about {c}",
    "{c} loses exclusive distribution deal with national retail chain",
]

HELDOUT_POSITIVE = [
    "{c} smashes analyst expectations with {p} profit growth in {q}",
    "{c} clinches {b} supply deal with national government",
    "{c} rallies as {firm} initiates coverage with outperform rating",
    "{c} raises prices without losing customers, sales up {p}",
    "{c} wins landmark court ruling, ending years of litigation",
    "{c} joins forces with global industry leader on next-generation products",
    "{c} reports strongest quarter in company history",
    "New {c} app tops download charts in first week",
    "{c} earns regulatory green light for new product line",
    "{c} expects earnings to grow {p} next year, above consensus",
    "{c} adds {k} enterprise clients, accelerating growth",
    "{c} trims costs by {m}, lifting profit margins",
]

HELDOUT_NEGATIVE = [
    "{c} falls short of analyst expectations as profit drops {p}",
    "{c} loses {b} contract after failing safety audit",
    "{c} slides as {firm} initiates coverage with underperform rating",
    "{c} forced to pull {n} products from market over contamination",
    "Court rules against {c} in lengthy litigation, awarding {m} in damages",
    "{c} founder steps down amid harassment allegations",
    "{c} reports weakest quarter in company history",
    "Hackers steal personal data of {n} {c} customers",
    "{c} fined {m} by regulators for misleading advertising",
    "{c} expects earnings to shrink {p} next year, below consensus",
    "{c} eliminates {j} jobs as orders dry up",
    "{c} halts shipments after key supplier goes bankrupt",
]

TRAIN_COMPANIES = [
    "Norvale Systems", "Brightwell Foods", "Quintara Therapeutics",
    "Halvorsen Logistics", "Crestmoor Energy", "Pellucid Labs",
    "Tamberlane Retail", "Corvane Aerospace", "Wyncliff Financial",
    "Ardentis Pharma", "Solvane Chemicals", "Kestrelmark Software",
    "Bluehaven Telecom", "Marrowdale Mining", "Ferriston Steel",
    "Orchidra Biotech", "Lumivar Semiconductors", "Gallowmere Insurance",
    "Thistlebrook Apparel", "Veradyne Robotics", "Copperwane Networks",
    "Stellanor Airlines", "Drummond Vale Holdings", "Quillfeather Media",
    "Harrowgate Pharmaceuticals", "Ambervine Beverages",
    "Rockhollow Construction", "Zephyrine Motors", "Calderwick Utilities",
    "Nimbrella Cloud", "Oxbury Medical", "Tidewell Shipping",
    "Sablecrest Hotels", "Mirelan Cosmetics", "Grantholm Industries",
    "Pinecastle Grocers", "Velmora Electronics", "Dunmarsh Agritech",
    "Elmstead Bancorp", "Fenwyck Games",
]

HELDOUT_COMPANIES = [
    "Ravenshollow Devices", "Glimmerton Foods", "Istrava Biosciences",
    "Morrowfield Energy", "Brackenmoor Freight", "Solstrand Airways",
    "Yarrowby Software", "Kelvara Materials", "Tessaly Health",
    "Ombridge Capital", "Wrenfield Motors", "Cinderpath Games",
    "Hollisworth Retail", "Larkspire Telecom", "Quorvia Pharma",
]

# Fictional analyst firms; kept disjoint between splits as well.
TRAIN_FIRMS = ["Harlow Securities", "Castellan Research", "Mosswood Capital",
               "Penrith Partners", "Blackfen Advisors"]
HELDOUT_FIRMS = ["Ivorton Equity", "Saltmarsh Research", "Greyling & Co"]

QUARTERS = ["Q1", "Q2", "Q3", "Q4", "first-quarter", "second-quarter",
            "third-quarter", "fourth-quarter"]


def fill(template: str, company: str, firms: list[str], rng: random.Random) -> str:
    values = {
        "c": company,
        "p": f"{rng.randint(3, 48)}%",
        "q": rng.choice(QUARTERS),
        "m": f"${rng.randrange(15, 955, 5)} million",
        "b": f"${rng.randint(1, 9)}.{rng.randint(1, 9)} billion",
        "pt": f"${rng.randint(12, 340)}",
        "n": f"{rng.randrange(5_000, 900_000, 500):,}",
        "k": str(rng.randint(4, 60)),
        "j": f"{rng.randrange(150, 6_000, 50):,}",
        "firm": rng.choice(firms),
    }
    return template.format(**values)


def build_split(pos_templates, neg_templates, companies, firms, n_total, rng):
    """Return a shuffled, label-balanced, duplicate-free list of examples."""
    assert n_total % 2 == 0
    per_label = n_total // 2
    examples = []
    seen = set()
    for label, templates in (("positive", pos_templates), ("negative", neg_templates)):
        # Cycle through shuffled templates / companies so coverage is even.
        tpl_order = list(templates)
        co_order = list(companies)
        rng.shuffle(tpl_order)
        rng.shuffle(co_order)
        made, attempts = 0, 0
        while made < per_label:
            attempts += 1
            assert attempts < 100 * per_label, "could not generate enough unique examples"
            template = tpl_order[made % len(tpl_order)]
            company = co_order[attempts % len(co_order)]
            headline = fill(template, company, firms, rng)
            n_words = len(headline.split())
            assert MIN_WORDS <= n_words <= MAX_WORDS, (n_words, headline)
            if headline in seen:
                continue
            seen.add(headline)
            examples.append({
                "template": template,
                "company": company,
                "record": {"messages": [
                    {"role": "user",
                     "content": PROMPT.format(headline=headline, company=company)},
                    {"role": "assistant", "content": label},
                ]},
            })
            made += 1
    rng.shuffle(examples)
    return examples


def check_disjoint(train, heldout):
    tpl_train = set(TRAIN_POSITIVE) | set(TRAIN_NEGATIVE)
    tpl_held = set(HELDOUT_POSITIVE) | set(HELDOUT_NEGATIVE)
    assert len(TRAIN_POSITIVE) >= 30 and len(TRAIN_NEGATIVE) >= 30
    assert len(HELDOUT_POSITIVE) >= 10 and len(HELDOUT_NEGATIVE) >= 10
    assert len(tpl_train) == len(TRAIN_POSITIVE) + len(TRAIN_NEGATIVE), "dup train template"
    assert len(tpl_held) == len(HELDOUT_POSITIVE) + len(HELDOUT_NEGATIVE), "dup heldout template"
    assert not tpl_train & tpl_held, "template overlap"
    assert {e["template"] for e in train} <= tpl_train
    assert {e["template"] for e in heldout} <= tpl_held

    assert len(set(TRAIN_COMPANIES)) == len(TRAIN_COMPANIES) == 40
    assert len(set(HELDOUT_COMPANIES)) == len(HELDOUT_COMPANIES) == 15
    assert not set(TRAIN_COMPANIES) & set(HELDOUT_COMPANIES), "company overlap"
    # Distinctive first words must differ too (e.g. no "Norvale X" in both).
    def first(names: list[str]) -> set[str]:
        return {n.split()[0].lower() for n in names}

    assert not first(TRAIN_COMPANIES) & first(HELDOUT_COMPANIES), "company stem overlap"
    assert not set(TRAIN_FIRMS) & set(HELDOUT_FIRMS), "analyst firm overlap"

    # No held-out-only name may appear anywhere in train text, and vice versa.
    train_text = "\n".join(json.dumps(e["record"]) for e in train).lower()
    held_text = "\n".join(json.dumps(e["record"]) for e in heldout).lower()
    for name in HELDOUT_COMPANIES + HELDOUT_FIRMS:
        assert name.split()[0].lower() not in train_text, name
    for name in TRAIN_COMPANIES + TRAIN_FIRMS:
        assert name.split()[0].lower() not in held_text, name
    assert {e["company"] for e in train} == set(TRAIN_COMPANIES)
    assert {e["company"] for e in heldout} == set(HELDOUT_COMPANIES)


def write_jsonl(path: Path, examples) -> list[str]:
    lines = [json.dumps(e["record"], ensure_ascii=True) for e in examples]
    for line in lines:
        assert line.isascii()
        rec = json.loads(line)
        assert [m["role"] for m in rec["messages"]] == ["user", "assistant"]
        assert rec["messages"][1]["content"] in ("positive", "negative")
    assert len(set(lines)) == len(lines), f"duplicate lines in {path}"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n", encoding="ascii", newline="\n")
    return lines


def main() -> None:
    repo_root = Path(__file__).resolve().parent.parent
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seed", type=int, default=SEED)
    ap.add_argument("--out-dir", type=Path,
                    default=repo_root / "presets" / "datasets" / "demo")
    args = ap.parse_args()

    rng = random.Random(args.seed)
    train = build_split(TRAIN_POSITIVE, TRAIN_NEGATIVE, TRAIN_COMPANIES,
                        TRAIN_FIRMS, N_TRAIN, rng)
    heldout = build_split(HELDOUT_POSITIVE, HELDOUT_NEGATIVE, HELDOUT_COMPANIES,
                          HELDOUT_FIRMS, N_HELDOUT, rng)
    check_disjoint(train, heldout)

    # No headline may occur in both splits.
    def headline(example: dict) -> str:
        return re.match(r"Headline: (.*)\n", example["record"]["messages"][0]["content"]).group(1)

    assert not {headline(e) for e in train} & {headline(e) for e in heldout}

    for name, examples, expected in (("train", train, N_TRAIN),
                                     ("heldout", heldout, N_HELDOUT)):
        path = args.out_dir / f"{name}.jsonl"
        lines = write_jsonl(path, examples)
        counts = Counter(e["record"]["messages"][1]["content"] for e in examples)
        assert len(lines) == expected
        assert counts["positive"] == counts["negative"] == expected // 2
        n_tpl = len({e["template"] for e in examples})
        n_co = len({e["company"] for e in examples})
        print(f"{path}: {len(lines)} examples, positive={counts['positive']}, "
              f"negative={counts['negative']}, templates={n_tpl}, companies={n_co}")
        for line in lines[:5]:
            print("  " + line)
    print("OK: no template, company, analyst-firm or headline overlap "
          "between train and heldout (asserted).")


if __name__ == "__main__":
    main()
