"""Generate the worked example's data set: customer support messages -> a JSON ticket.

Deterministic (a fixed seed): the same files on every machine, so scores are comparable. Each line is a
chat: a system instruction, the customer's message, and the ticket as the assistant's reply, e.g.
    {"category": "billing", "priority": "urgent", "product": "mobile app"}

The label of each field is carried by what the message says (a charge, a crash, a login, a parcel, a
wish; how pressing it is; which product), phrased through many templates, names and fillers, so a model
must read the message rather than memorize lines. Splits: train / dev (eval loss while training) / test
(held out: scored by tickets.yaml).

    python examples/tickets/make_data.py --out examples/tickets/data
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

SYSTEM = (
    "Turn the customer message into a JSON ticket with keys category "
    "(billing, bug, account, shipping, feature_request), priority (low, normal, urgent) and product "
    "(mobile app, website, desktop app, smart speaker, api). Reply with the JSON only."
)

PRODUCTS = {
    "mobile app": ["the mobile app", "your phone app", "the app on my iPhone", "the Android app"],
    "website": ["the website", "your site", "the web page", "the online store"],
    "desktop app": ["the desktop app", "the Windows program", "the Mac app", "the desktop client"],
    "smart speaker": ["the smart speaker", "my speaker", "the voice speaker", "the speaker I bought"],
    "api": ["the API", "your REST API", "the API endpoint", "the developer API"],
}

CATEGORY = {
    "billing": [
        "I was charged twice for my subscription through {p}",
        "my invoice from {p} shows the wrong amount",
        "I need a refund for a payment I made in {p}",
        "my card was billed after I cancelled, via {p}",
        "the price I paid in {p} does not match the receipt",
    ],
    "bug": [
        "{p} crashes every time I open the settings",
        "{p} shows an error when I try to save",
        "{p} freezes after the latest update",
        "buttons in {p} stopped responding",
        "{p} keeps returning a blank screen",
    ],
    "account": [
        "I can't log in to {p}, it says my password is wrong",
        "I want to change the email on my account in {p}",
        "my account got locked in {p}",
        "the password reset link from {p} never arrives",
        "please delete my account, I signed up through {p}",
    ],
    "shipping": [
        "I ordered {p} two weeks ago and the package has not arrived",
        "the tracking number for {p} does not work",
        "{p} was delivered to the wrong address",
        "the box with {p} arrived damaged",
        "my order of {p} is stuck in customs",
    ],
    "feature_request": [
        "it would be great if {p} had a dark mode",
        "could you add an export to CSV option in {p}",
        "please let {p} support more languages",
        "I wish {p} could sync with my calendar",
        "any plans to add offline mode to {p}",
    ],
}
# shipping is about a physical thing or order: those sentences use the product as an object
PRIORITY = {
    "urgent": [
        "This is urgent, please fix it today!",
        "I need this solved ASAP.",
        "Our whole team is blocked right now.",
        "Please help immediately, it is costing us money.",
    ],
    "normal": [
        "Can you take a look?",
        "Thanks for checking.",
        "Let me know what you find.",
        "Please advise.",
    ],
    "low": [
        "No rush at all, whenever you have time.",
        "Not important, just letting you know.",
        "Low priority, it can wait.",
        "Just a small thing for later.",
    ],
}
GREETINGS = ["Hi,", "Hello,", "Hey team,", "Good morning,", "", "Dear support,"]
SIGNOFFS = ["", "Thanks, {n}", "- {n}", "Best, {n}", "Regards, {n}", "{n}"]
NAMES = ["Ana", "Bo", "Chen", "Dara", "Eli", "Femi", "Gus", "Hana", "Ivo", "Jun", "Kai", "Lea", "Mo", "Nia"]


def example(rng: random.Random) -> dict:
    category = rng.choice(sorted(CATEGORY))
    product = rng.choice(sorted(PRODUCTS))
    priority = rng.choices(["urgent", "normal", "low"], weights=[3, 4, 3])[0]
    sentence = rng.choice(CATEGORY[category]).format(p=rng.choice(PRODUCTS[product]))
    sentence = sentence[0].upper() + sentence[1:] + "."
    parts = [rng.choice(GREETINGS), sentence, rng.choice(PRIORITY[priority])]
    if rng.random() < 0.3:
        parts.insert(2, f"Order #{rng.randint(10000, 99999)}.")
    parts.append(rng.choice(SIGNOFFS).format(n=rng.choice(NAMES)))
    message = " ".join(p for p in parts if p)
    ticket = json.dumps({"category": category, "priority": priority, "product": product})
    return {
        "messages": [
            {"role": "system", "content": SYSTEM},
            {"role": "user", "content": message},
            {"role": "assistant", "content": ticket},
        ]
    }


def make_splits(seed: int = 8, sizes: dict[str, int] | None = None) -> dict[str, list[dict]]:
    sizes = sizes or {"train": 800, "dev": 48, "test": 200}
    rng = random.Random(seed)
    seen: set[str] = set()
    out: dict[str, list[dict]] = {}
    for split, n in sizes.items():  # no user message appears in two splits
        rows: list[dict] = []
        while len(rows) < n:
            ex = example(rng)
            text = ex["messages"][1]["content"]
            if text not in seen:
                seen.add(text)
                rows.append(ex)
        out[split] = rows
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=str(Path(__file__).parent / "data"), help="folder for the JSONL splits")
    ap.add_argument("--seed", type=int, default=8)
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for split, rows in make_splits(args.seed).items():
        with open(out / f"{split}.jsonl", "w") as f:
            for r in rows:
                f.write(json.dumps(r) + "\n")
        print(f"{out / split}.jsonl: {len(rows)} examples")


if __name__ == "__main__":
    main()
