"""Build the two tiny teachers this example's config names, so `mdkd cache-logits` has something to run.

A real run points the config at hub ids or checkpoint folders instead; these teachers have random weights and
exist only to exercise the pipeline: a German WordPiece BERT and a multilingual Unigram XLM-R.
"""

from pathlib import Path

from mdkd.tiny_models import build_masked_lm, train_tokenizer

here = Path(__file__).resolve().parent
texts = {
    language: (here / "corpus" / f"{language}.txt").read_text(encoding="utf-8").splitlines()
    for language in ("en", "de", "ru")
}
teachers = here / "teachers"
# Teachers that exist are kept: `tokenizers` trains slightly different vocabularies from run to run
# (huggingface/tokenizers#1794), and a cache built from the old teachers would refuse new ones.
if not (teachers / "de_bert" / "config.json").exists():
    build_masked_lm("bert", train_tokenizer("wordpiece", texts["de"], 400, teachers / "de_bert"), teachers / "de_bert")
if not (teachers / "multi_xlmr" / "config.json").exists():
    every_text = [line for lines in texts.values() for line in lines]
    build_masked_lm(
        "xlm-roberta", train_tokenizer("unigram", every_text, 600, teachers / "multi_xlmr"), teachers / "multi_xlmr"
    )
print(f"teachers in {teachers}")
