"""Round-trip verification of an export: what was written answers the held-out prompts as the adapter did.

Every export re-loads its own output and answers a fixed set of held-out prompts greedily; the
answers are compared with the adapter's. A GGUF file is run in llama.cpp itself when
llama-cpp-python is installed (what Ollama and LM Studio run), fed the prompt ids our chat
template gives, and llama.cpp's own tokenisation of the rendered prompt is compared with the
Hugging Face tokenizer's (a wrong pre-tokenizer shows up there); without it, transformers' GGUF
loader reads the file back. The result goes into the run card under "exports".
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from tunewiz.engine.errors import TunewizError
from tunewiz.engine.fileio import atomic_write_json, read_json

AGREEMENT_NEEDED = 0.95  # below this share of identical answers the export gets a loud warning
SHOWN_DIFFERENCES = 5


@dataclass
class Prompts:
    """The held-out conversations (system prompt included) and the adapter's greedy answers."""

    conversations: list[list[dict[str, str]]]
    prompt_ids: list[list[int]]
    prompt_texts: list[str]
    answers: list[str]
    max_new_tokens: int
    origin: str


@dataclass
class Check:
    """How an export's answers compare with the adapter's."""

    label: str  # "GGUF q8_0", "merged bf16"
    engine: str  # what re-loaded the export
    identical: int
    total: int
    origin: str
    tokenization_mismatches: int = 0
    template_stored: bool = True
    differences: list[dict[str, str]] = field(default_factory=list)

    @property
    def summary(self) -> str:
        return f"{self.label}: {self.identical}/{self.total} answers identical to the adapter (run in {self.engine})"

    def warning(self, quantised: bool) -> str | None:
        """A loud line naming the likely cause when too many answers differ, else None."""
        if self.total and self.identical / self.total >= AGREEMENT_NEEDED and not self.tokenization_mismatches \
                and self.template_stored:
            return None
        if not self.template_stored:
            cause = "the chat template stored in the file is not the one the run used"
        elif self.tokenization_mismatches:
            cause = (f"the tokenizer: {self.engine} splits {self.tokenization_mismatches} of {self.total} prompts "
                     "differently from the Hugging Face tokenizer (pre-tokenizer or vocabulary)")
        elif any(d["export"].startswith(d["adapter"]) and d["export"] != d["adapter"] for d in self.differences):
            cause = "a stop token: the export's answers run on past where the adapter's end"
        elif quantised:
            cause = "quantisation: the weights lost precision; a 16-bit type (f16 or bf16) keeps the answers"
        else:
            cause = "the chat template or the weights: the export answers differently with the same prompt ids"
        return (f"WARNING: {self.identical}/{self.total} answers of the {self.label} export match the adapter's; "
                f"likely cause: {cause}")

    def record(self, extra: dict[str, Any]) -> dict[str, Any]:
        return {**asdict(self), "summary": self.summary, **extra}


def adapter_answers(loaded: Any, limit: int | None, on_progress: Callable[[str], None]) -> Prompts:
    """The held-out prompts of the run and the adapter's greedy answers (before any merge)."""
    from tunewiz.engine.use.evaluate import answer_budget
    from tunewiz.engine.use.heldout import heldout_examples

    heldout = heldout_examples(loaded.run, limit)
    examples = heldout.examples
    budget = answer_budget(loaded, [e.reference for e in examples])
    conversations = [loaded.conversation(e.messages) for e in examples]
    answers = []
    for index, example in enumerate(examples, 1):
        if index == 1 or index % 10 == 0 or index == len(examples):
            on_progress(f"adapter: answering held-out prompt {index}/{len(examples)}")
        answers.append(loaded.answers([example.messages], budget)[0])
    texts = [loaded.encoder.render(c, add_generation_prompt=True) for c in conversations]
    ids = [loaded.encoder.prompt_ids(c) for c in conversations]
    return Prompts(conversations, ids, texts, answers, budget, heldout.origin)


def _compare(label: str, engine: str, prompts: Prompts, got: list[str], **extra: Any) -> Check:
    differences = [{"prompt": c[-1]["content"], "adapter": a, "export": g}
                   for c, a, g in zip(prompts.conversations, prompts.answers, got) if a != g]
    return Check(label, engine, len(got) - len(differences), len(got), prompts.origin,
                 differences=differences[:SHOWN_DIFFERENCES], **extra)


def check_merged(folder: Path, label: str, prompts: Prompts, encoder: Any) -> Check:
    """Re-load a merged model folder with plain transformers and answer the prompts."""
    from tunewiz.engine.training.generate import answer

    model = _load_transformers(folder, None)
    got = [answer(model, encoder, c, prompts.max_new_tokens) for c in prompts.conversations]
    return _compare(label, "transformers", prompts, got)


def check_gguf(path: Path, label: str, prompts: Prompts, encoder: Any, chat_template: str | None,
               on_progress: Callable[[str], None]) -> Check:
    """Re-load a GGUF file (llama.cpp when installed, else transformers) and answer the prompts."""
    stored = _stored_template(path) == chat_template
    try:
        import llama_cpp  # noqa: F401 - only whether it is there
    except ImportError:
        on_progress("checking the GGUF file with transformers' GGUF loader (llama-cpp-python is not installed)")
        return _check_gguf_transformers(path, label, prompts, encoder, stored)
    on_progress("checking the GGUF file in llama.cpp")
    return _check_gguf_llama_cpp(path, label, prompts, encoder, stored, on_progress)


def _stored_template(path: Path) -> str | None:
    from gguf import GGUFReader

    field_ = GGUFReader(path).fields.get("tokenizer.chat_template")
    return field_.contents() if field_ is not None else None


def _load_transformers(folder: Path, gguf_file: str | None) -> Any:
    import torch
    from transformers import AutoModelForCausalLM

    kwargs = {"gguf_file": gguf_file} if gguf_file else {}
    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, **kwargs).eval()


def _check_gguf_transformers(path: Path, label: str, prompts: Prompts, encoder: Any, stored: bool) -> Check:
    from transformers import AutoTokenizer

    from tunewiz.engine.training.generate import answer

    tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    mismatches = sum(tokenizer(text, add_special_tokens=False)["input_ids"] != ids
                     for text, ids in zip(prompts.prompt_texts, prompts.prompt_ids))
    model = _load_transformers(path.parent, path.name)
    got = [answer(model, encoder, c, prompts.max_new_tokens) for c in prompts.conversations]
    return _compare(label, "transformers' GGUF loader", prompts, got, tokenization_mismatches=mismatches,
                    template_stored=stored)


def _check_gguf_llama_cpp(path: Path, label: str, prompts: Prompts, encoder: Any, stored: bool,
                          on_progress: Callable[[str], None]) -> Check:
    """Run the prompts in llama.cpp in a child process (`python -m tunewiz.engine.use.export_check`): a crash there
    (llama.cpp's CPU kernels can crash on machines that do not allow them) must not take the export down."""
    import json
    import subprocess
    import sys

    request = {"path": str(path), "prompt_ids": prompts.prompt_ids, "prompt_texts": prompts.prompt_texts,
               "stop_ids": sorted(set(encoder.stop_token_ids)), "max_new_tokens": prompts.max_new_tokens}
    child = subprocess.run([sys.executable, "-m", "tunewiz.engine.use.export_check"], input=json.dumps(request),
                           capture_output=True, text=True, check=False)
    if child.returncode < 0:  # killed by a signal: llama.cpp crashed
        on_progress(f"WARNING: llama.cpp crashed running the file on this machine (signal {-child.returncode}); "
                    "checking it with transformers' GGUF loader instead")
        return _check_gguf_transformers(path, label, prompts, encoder, stored)
    if child.returncode != 0:
        raise TunewizError(f"llama.cpp cannot run the written file {path.name}: {child.stderr.strip()[-500:]}",
                           hint="this is a bug in tunewiz's GGUF export; please report it, and use --merged "
                                "meanwhile")
    answer = json.loads(child.stdout)
    mismatches, outputs = answer["mismatches"], answer["outputs"]
    got = [encoder.tokenizer.decode(ids, skip_special_tokens=True).strip() for ids in outputs]
    return _compare(label, "llama.cpp", prompts, got, tokenization_mismatches=mismatches, template_stored=stored)


def _answer_in_llama_cpp(path: str, prompt_ids: list[list[int]], prompt_texts: list[str], stop_ids: list[int],
                         max_new_tokens: int) -> tuple[int, list[list[int]]]:
    """(prompts llama.cpp tokenises differently, the answer ids): runs in the child process."""
    import logging

    logging.getLogger("llama-cpp-python").setLevel(logging.ERROR)
    from llama_cpp import Llama

    longest = max(len(ids) for ids in prompt_ids) + max_new_tokens
    llm = Llama(model_path=path, n_ctx=max(512, longest + 16), n_threads=os.cpu_count() or 1, verbose=False, seed=0)
    stops = set(stop_ids) | {llm.token_eos()}
    mismatches = sum(llm.tokenize(text.encode("utf-8"), add_bos=False, special=True) != ids
                     for text, ids in zip(prompt_texts, prompt_ids))
    outputs = []
    for ids in prompt_ids:
        new: list[int] = []
        for token in llm.generate(ids, top_k=1, temp=0.0, repeat_penalty=1.0, reset=True):
            if token in stops or len(new) >= max_new_tokens:
                break
            new.append(token)
        outputs.append(new)
    llm.close()
    return mismatches, outputs


def record_in_run_card(output_dir: Path, entry: dict[str, Any]) -> None:
    """Append the export to run_card.json's "exports" list (the card is written when training ends)."""
    path = output_dir / "run_card.json"
    card = read_json(path) or {}
    card.setdefault("exports", []).append(entry)
    atomic_write_json(path, card)


if __name__ == "__main__":  # the llama.cpp child: a JSON request on stdin, the answers on stdout
    import json
    import sys

    job = json.load(sys.stdin)
    found, answers = _answer_in_llama_cpp(job["path"], job["prompt_ids"], job["prompt_texts"], job["stop_ids"],
                                          job["max_new_tokens"])
    print(json.dumps({"mismatches": found, "outputs": answers}))
