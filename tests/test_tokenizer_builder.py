"""The tokenizer builder (`python -m ldm.tokenizer`): the same captions give the same vocabulary,
run after run.

HF tokenizers' WordPiece trainer alone numbers its "##c" tokens in hash-map order, which breaks
ties between merges differently in every process (huggingface/tokenizers#1794): before the fix,
4 runs on this data gave 4 different vocabularies, so a re-run of the same command trained a
different model. Each run here is a separate process, as a user's re-run is.
"""
import json

from conftest import run_script

BUILD = """
import json, sys
from ldm.data.tokenizer import build_vocab, iter_captions
print(json.dumps(build_vocab(lambda: iter_captions(sys.argv[1]))))
"""


def test_the_same_captions_give_the_same_vocabulary_in_every_process(shapes):
    vocabularies = []
    for _ in range(4):
        res = run_script(["-c", BUILD, shapes["file_list"]])
        assert res.returncode == 0, res.stderr[-2000:]
        vocabularies.append(json.loads(res.stdout))
    assert {"circle", "triangle", "square"} <= set(vocabularies[0])  # it learnt the captions' words
    different = len({"\n".join(v) for v in vocabularies})
    assert different == 1, f"{different} different vocabularies from 4 runs on the same captions"
