"""The demo task, generated (no downloads): extract the payoff amount and the payment due date
from a synthetic loan statement into JSON.

The statements are built to trip a small generic model: several dollar amounts (balance,
minimum payment, fees, interest) beside the payoff amount, several dates (statement date, good
through date, last payment) beside the due date, varied layouts and wording, and the answer in
a normalised form (number with two decimals, ISO date) whatever the statement's own format.
"""

from __future__ import annotations

import datetime as dt
import json
import random
from pathlib import Path

INSTRUCTION = (
    "Extract the payoff amount and the payment due date from this loan statement. Answer with JSON "
    'only: {"payoff_amount": <number>, "due_date": "YYYY-MM-DD"}.'
)

# The answers' JSON schema: the evaluation also runs base and adapter forced into it.
SCHEMA = {"type": "object", "additionalProperties": False, "required": ["payoff_amount", "due_date"],
          "properties": {"payoff_amount": {"type": "number"},
                         "due_date": {"type": "string", "pattern": "^[0-9]{4}-[0-9]{2}-[0-9]{2}$"}}}

LENDERS = ("First Harbor Bank", "Summit Credit Union", "Northwind Lending", "Bluewater Financial",
           "Cedar Mortgage Co.", "Pinecrest Auto Finance", "Lakeside Savings", "Redwood Capital")
FIRST_NAMES = ("Maria", "James", "Aisha", "Wei", "Olga", "Carlos", "Priya", "Tom", "Fatima", "Lukas")
LAST_NAMES = ("Garcia", "Smith", "Khan", "Chen", "Ivanova", "Lopez", "Patel", "Brown", "Haddad", "Weber")
LOAN_KINDS = ("auto loan", "personal loan", "mortgage", "student loan", "home equity loan")
PAYOFF_LABELS = ("Payoff amount", "Total payoff", "Amount to pay off loan", "Payoff quote", "Full payoff balance")
DUE_LABELS = ("Payment due date", "Due date", "Next payment due", "Please pay by", "Payment due")


def _money(rng: random.Random, low: float, high: float) -> float:
    return round(rng.uniform(low, high), 2)


def _format_money(value: float, rng: random.Random) -> str:
    style = rng.randrange(3)
    if style == 0:
        return f"${value:,.2f}"
    if style == 1:
        return f"USD {value:,.2f}"
    return f"${value:.2f}"


def _format_date(day: dt.date, rng: random.Random) -> str:
    style = rng.randrange(4)
    if style == 0:
        return day.strftime("%B %d, %Y").replace(" 0", " ")
    if style == 1:
        return day.strftime("%m/%d/%Y")
    if style == 2:
        return day.strftime("%d %b %Y").lstrip("0")
    return day.isoformat()


def make_statement(rng: random.Random) -> tuple[str, dict]:
    """One statement and its answer ``{"payoff_amount": float, "due_date": "YYYY-MM-DD"}``."""
    statement_date = dt.date(2025, 1, 1) + dt.timedelta(days=rng.randrange(700))
    due_date = statement_date + dt.timedelta(days=rng.randrange(14, 32))
    good_through = statement_date + dt.timedelta(days=rng.randrange(5, 45))
    last_payment = statement_date - dt.timedelta(days=rng.randrange(10, 35))
    principal = _money(rng, 1500, 250000)
    interest = _money(rng, 5, 900)
    fees = _money(rng, 0, 60)
    payoff = round(principal + interest + fees, 2)
    minimum = _money(rng, 80, 2200)
    borrower = f"{rng.choice(FIRST_NAMES)} {rng.choice(LAST_NAMES)}"
    account = f"{rng.randrange(10**7, 10**8)}"
    money = lambda v: _format_money(v, rng)  # noqa: E731
    date = lambda d: _format_date(d, rng)  # noqa: E731
    lines = [
        f"Principal balance: {money(principal)}",
        f"Accrued interest: {money(interest)}",
        f"Late fees and charges: {money(fees)}",
        f"Minimum payment due: {money(minimum)}",
        f"{rng.choice(PAYOFF_LABELS)} (good through {date(good_through)}): {money(payoff)}",
        f"{rng.choice(DUE_LABELS)}: {date(due_date)}",
        f"Last payment received: {date(last_payment)}",
    ]
    rng.shuffle(lines)
    header = [rng.choice(LENDERS), f"{rng.choice(LOAN_KINDS).title()} statement",
              f"Statement date: {date(statement_date)}", f"Borrower: {borrower}  Account: {account}"]
    text = "\n".join(header + lines)
    return text, {"payoff_amount": payoff, "due_date": due_date.isoformat()}


def make_example(rng: random.Random) -> dict:
    """A chat-format training example (the format ``loraplex train`` reads)."""
    text, answer = make_statement(rng)
    return {"messages": [{"role": "user", "content": f"{INSTRUCTION}\n\n{text}"},
                         {"role": "assistant", "content": json.dumps(answer)}]}


def write_demo_data(out_dir: Path, num_train: int, num_eval: int, seed: int = 0) -> tuple[Path, Path]:
    """``train.jsonl`` and ``eval.jsonl`` under ``out_dir``, from disjoint random streams."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = out_dir / "train.jsonl", out_dir / "eval.jsonl"
    for path, count, stream in zip(paths, (num_train, num_eval), (seed * 2, seed * 2 + 1)):
        rng = random.Random(f"loraplex-demo-{stream}")
        path.write_text("".join(json.dumps(make_example(rng)) + "\n" for _ in range(count)))
    return paths
