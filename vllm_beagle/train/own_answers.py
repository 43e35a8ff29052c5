"""Training dialogues from a ShareGPT file's own answers: no generation, only the target's prefill.

The target's answers (responses.py) cost hours of generation; the file's own assistant turns cost
nothing but the pass that extracts the target's states over them, and the draft still learns the
target's distribution there (its soft targets are the target's, whatever text the context holds). What
they cannot teach is the target's own habits of phrasing, so they are extra data beside its answers,
not a replacement (`beagle data --answers dataset`).

A conversation's turn k is the chat template over its first k user turns and the k - 1 answers
before them (its prompt) and the k-th assistant turn as the template renders it, end-of-turn tokens
included (its answer); turns stop at the first user turn without an answer after it, after `turns`
answers, or where the whole conversation would pass `max_len` tokens.
"""

from __future__ import annotations

from ..prompts import chat_ids
from .responses import Conversation, Dialogue
from .sharegpt import ShareGPTReader, exchanges


def dataset_dialogues(path: str, conversations: list[Conversation], tokenizer, max_len: int,
                      turns: int) -> dict[int, Dialogue]:
    """The dialogues of `conversations` (by their index) with the file's own answers; a conversation
    whose first answer does not fit is left out."""
    wanted = {c.record: c.index for c in conversations}
    dialogues = {}
    for number, record in enumerate(ShareGPTReader(path)):
        if number not in wanted:
            continue
        messages, pairs = [], []
        for user, answer in (exchanges(record) or [])[:turns]:
            messages.append({"role": "user", "content": user})
            prompt = chat_ids(tokenizer, messages)
            messages.append({"role": "assistant", "content": answer})
            whole = list(tokenizer.apply_chat_template(messages, tokenize=True, return_dict=False))
            if len(whole) > max_len or whole[:len(prompt)] != prompt:
                break
            pairs.append((prompt, whole[len(prompt):]))
        if pairs:
            dialogues[wanted[number]] = Dialogue(wanted[number], number, pairs)
    return dialogues
