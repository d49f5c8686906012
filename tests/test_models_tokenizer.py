"""Tokenizer built from OpenAI's BPE merges (read from ../shared, never copied) on the 1000
real MSR-VTT test captions, checked against a plain BPE written here from the merges."""
import csv

import pytest

from conftest import SHARED
from tvr_models.tokenizer import ClipTokenizer, bytes_to_unicode, openai_vocab

BPE = SHARED / "data" / "clip" / "bpe_simple_vocab_16e6.txt.gz"
CAPTIONS = SHARED / "data" / "msrvtt" / "MSRVTT_JSFUSION_test.csv"

pytestmark = pytest.mark.skipif(not (BPE.exists() and CAPTIONS.exists()),
                                reason="../shared/data (CLIP BPE merges, MSR-VTT captions) not present")


class PlainBPE:
    """OpenAI-CLIP-style BPE on lower-cased, whitespace-collapsed text (captions are ASCII)."""

    def __init__(self, bpe_gz):
        import regex
        vocab, merges = openai_vocab(str(bpe_gz))
        self.encoder = {t: i for i, t in enumerate(vocab)}
        self.rank = {m: i for i, m in enumerate(merges)}
        self.by_rank = dict(enumerate(merges))
        self.byte = bytes_to_unicode()
        self.pat = regex.compile(r"""'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+""",
                                 regex.IGNORECASE)

    def bpe(self, token):
        word = list(token[:-1]) + [token[-1] + "</w>"]
        while len(word) > 1:
            pairs = [(self.rank.get((a, b), float("inf")), i) for i, (a, b) in enumerate(zip(word, word[1:]))]
            best, _ = min(pairs)
            if best == float("inf"):
                break
            pair = self.by_rank[best]
            out, i = [], 0
            while i < len(word):
                if i < len(word) - 1 and (word[i], word[i + 1]) == pair:
                    out.append(word[i] + word[i + 1])
                    i += 2
                else:
                    out.append(word[i])
                    i += 1
            word = out
        return word

    def encode(self, text):
        text = " ".join(text.split()).lower()
        ids = []
        for tok in self.pat.findall(text):
            tok = "".join(self.byte[b] for b in tok.encode("utf-8"))
            ids.extend(self.encoder[p] for p in self.bpe(tok))
        return ids


@pytest.fixture(scope="module")
def captions():
    with open(CAPTIONS, newline="") as f:
        return [row["sentence"] for row in csv.DictReader(f)]


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return ClipTokenizer.from_bpe(str(BPE), str(tmp_path_factory.mktemp("clip_tok")), max_length=32)


def test_vocabulary_layout():
    vocab, merges = openai_vocab(str(BPE))
    assert len(merges) == 49152 - 256 - 2 and len(vocab) == 49408
    assert vocab[-2:] == ["<|startoftext|>", "<|endoftext|>"]
    assert vocab[256] == vocab[0] + "</w>"


def test_real_captions_match_plain_bpe(tokenizer, captions):
    assert len(captions) == 1000
    plain = PlainBPE(BPE)
    ids, mask = tokenizer(captions)
    assert ids.shape == (1000, 32) and mask.shape == (1000, 32)
    assert (ids[:, 0] == 49406).all()
    for i, cap in enumerate(captions):
        want = [49406] + plain.encode(cap)[:30] + [49407]
        n = len(want)
        assert ids[i, :n].tolist() == want, cap
        assert (ids[i, n:] == 0).all() and mask[i].sum().item() == n
    # EOT is the largest id, so argmax pooling finds it (once per row)
    assert ((ids == 49407).sum(1) == 1).all()
    assert (ids.argmax(1) == mask.sum(1) - 1).all()
    # known ids of OpenAI's vocabulary
    assert tokenizer.encode("a") == [320]


def test_truncation_keeps_eot(tokenizer):
    long = " ".join(["guitar"] * 50)
    ids, mask = tokenizer([long])
    assert ids[0, -1].item() == 49407 and mask[0].all()
