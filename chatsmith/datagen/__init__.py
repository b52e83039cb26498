"""Data collection with a teacher model: self-instruct (Alpaca), self-chat (Baize), translation and
quality scoring through any OpenAI-compatible endpoint, and a local page where a person ranks a
model's answers (`chatsmith label`).

teacher.py        the client (concurrency, retries with backoff, usage and cost) and the resumable journal
seeds.py          seed tasks / questions from self-instruct, Alpaca, ShareGPT files or plain lists
parsing.py        numbered lists, JSON objects and refusals in a teacher's answer
rouge.py          ROUGE-L F1 and the indexed pool that rejects near-copies of earlier instructions
self_instruct.py  `chatsmith data self-instruct`
self_chat.py      `chatsmith data self-chat`
teacher_ops.py    `chatsmith data translate` and the teacher-scored quality filter of `data filter`
label.py          `chatsmith label`: the ranking page's server and the files it writes
"""
