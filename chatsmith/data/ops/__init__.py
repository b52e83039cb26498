"""Dataset tools that stream (`chatsmith data mix|dedupe|split|filter|sample|clean`): records go
through one at a time, so a million-record file runs in bounded memory. Translation and the
teacher-scored quality filter need a teacher endpoint and live in chatsmith/datagen/teacher_ops.py.

stream.py    streaming JSONL / JSON-list reading and writing; the text fields of any record
select.py    mix (ratios or counts, seeded, external shuffle), sample, split, filter (batch predicates)
dedupe.py    exact and MinHash-LSH near-duplicate removal with 8-byte keys
minhash.py   MinHash signatures and LSH banding
language.py  a script and function-word language guesser for filter --lang
clean.py     FastChat-style ShareGPT cleaning: HTML to Markdown, broken turns, splitting long conversations
convert.py   one raw record -> a Conversation, through the readers' converters
"""
