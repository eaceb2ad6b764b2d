"""The lm-evaluation-harness bridge: a newllm model through `lm_eval.models.huggingface.HFLM`, offline.

    from newllm.eval.harness import wikitext_task, run_harness
    docs = wikitext_pages("test", limit=10)          # the local WikiText-2 file, one page per article
    results = run_harness(hf_model, hf_tok, [wikitext_task(docs)], max_length=2048)

`wikitext_task(pages)` is lm-eval's own `wikitext` task (its `wikitext_detokenizer` as
`doc_to_target`, its `process_results`, its metrics `word_perplexity`, `byte_perplexity`,
`bits_per_byte`) with the dataset replaced by the given pages, held in memory
(`custom_dataset`): nothing is downloaded, and the Hub is never asked (`run_harness` sets
HF_HUB_OFFLINE / HF_DATASETS_OFFLINE for the run). Other lm-eval task names go through lm-eval's
own TaskManager, offline too: they work when their data is already in the local Hugging Face cache
or is a local-file task from `include_path`.

Pages. lm-eval's wikitext reads EleutherAI/wikitext_document_level (the raw WikiText-2, one page
per article). Here the pages are the articles of the local `wiki.{split}.tokens` file as
`newllm.data.corpora` cuts them (60 in the test split); that file is the tokenised (non-raw) v1
WikiText-2 (`<unk>` in place of rare words), so the numbers are not the published raw-WikiText
ones, but lm-eval and `newllm.eval.rolling` see exactly the same pages.
"""
from __future__ import annotations

import importlib.util
import os
from contextlib import contextmanager
from pathlib import Path

from newllm.errors import NewLLMError

WIKITEXT = "wikitext"
METRICS = ("word_perplexity", "byte_perplexity", "bits_per_byte")
DEFAULT_MAX_LENGTH = 2048  # lm-eval's HFLM default when neither config nor tokenizer gives one
OFFLINE = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}


def wikitext_pages(split: str = "test", limit: int | None = None, data_dir=None) -> list[str]:
    """The first `limit` (default all) articles of the local WikiText-2 split, as original text."""
    from newllm.data.corpora import load_documents

    if limit is not None and limit < 1:
        raise NewLLMError(f"limit must be >= 1 document, got {limit}")
    pages = load_documents("wikitext-2", split, data_dir)
    return pages if limit is None else pages[:limit]


def _lm_eval_wikitext_module():
    """lm-eval's tasks/wikitext/preprocess_wikitext.py (a file of its task folder, not a package)."""
    try:
        import lm_eval
    except ImportError:
        raise NewLLMError("the lm-eval bridge needs the optional 'lm_eval' package: pip install 'newllm[lmeval]'") \
            from None
    path = Path(lm_eval.__file__).parent / "tasks" / "wikitext" / "preprocess_wikitext.py"
    if not path.is_file():
        raise NewLLMError(f"{path}: lm-eval's wikitext task is not where lm_eval 0.4 keeps it")
    spec = importlib.util.spec_from_file_location("lm_eval_preprocess_wikitext", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def wikitext_task(pages: list[str], name: str = WIKITEXT):
    """lm-eval's wikitext task over `pages` held in memory (module doc)."""
    import datasets
    from lm_eval.api.task import ConfigurableTask

    if not pages or not all(isinstance(p, str) and p.strip() for p in pages):
        raise NewLLMError("wikitext_task: pages must be a non-empty list of non-blank texts")
    pw = _lm_eval_wikitext_module()
    data = {"test": datasets.Dataset.from_dict({"page": list(pages)})}
    return ConfigurableTask(config={
        "task": name, "custom_dataset": lambda **_: data, "output_type": "loglikelihood_rolling",
        "test_split": "test", "doc_to_text": "", "doc_to_target": pw.wikitext_detokenizer,
        "process_results": pw.process_results, "metric_list": [{"metric": m} for m in METRICS],
        "metadata": {"version": 2.0, "pages": f"{len(pages)} local pages"},
    })


def prefix_token_id(hf_tok) -> int:
    """lm-eval's `prefix_token_id` rule: the tokenizer's BOS, else its EOS."""
    tid = hf_tok.bos_token_id if hf_tok.bos_token_id is not None else hf_tok.eos_token_id
    if tid is None:
        raise NewLLMError("the tokenizer has neither a BOS nor an EOS token to put before each document "
                          "(lm-eval's prefix token); pass prefix_token_id")
    return int(tid)


def default_max_length(model_config) -> int:
    """lm-eval's HFLM default: the config's max_position_embeddings, else 2048."""
    return model_config.max_position_embeddings or DEFAULT_MAX_LENGTH


@contextmanager
def offline():
    """The Hugging Face libraries offline for the block, as they were after it: the environment
    variables (for anything that reads them later) and the flags huggingface_hub and datasets read
    them into when they were imported (transformers is imported long before a run starts)."""
    import datasets.config
    import huggingface_hub.constants

    old_env = {k: os.environ.get(k) for k in OFFLINE}
    flags = [(huggingface_hub.constants, "HF_HUB_OFFLINE"), (datasets.config, "HF_HUB_OFFLINE"),
             (datasets.config, "HF_DATASETS_OFFLINE")]
    old_flags = [getattr(m, name) for m, name in flags]
    os.environ.update(OFFLINE)
    for m, name in flags:
        setattr(m, name, True)
    try:
        yield
    finally:
        for (m, name), value in zip(flags, old_flags):
            setattr(m, name, value)
        for k, v in old_env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def run_harness(hf_model, hf_tok, tasks: list, max_length: int | None = None, prefix: int | None = None,
                batch_size: int = 1, limit: int | None = None, include_path=None) -> dict:
    """`lm_eval.simple_evaluate` on `HFLM(pretrained=hf_model, tokenizer=hf_tok)`; `tasks` are Task
    objects (`wikitext_task`) or lm-eval task names. Returns lm-eval's `results` mapping
    (task -> {"word_perplexity,none": ..., ...})."""
    _lm_eval_wikitext_module()  # the one-line error when lm_eval is missing
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    if batch_size < 1:
        raise NewLLMError(f"batch_size must be >= 1, got {batch_size}")
    names = [t for t in tasks if isinstance(t, str)]
    with offline():
        lm = HFLM(pretrained=hf_model, tokenizer=hf_tok, backend="causal", batch_size=batch_size,
                  max_length=max_length or default_max_length(hf_model.config.model_config),
                  prefix_token_id=prefix_token_id(hf_tok) if prefix is None else prefix, add_bos_token=False,
                  logits_cache=False)
        manager = TaskManager(include_defaults=bool(names), include_path=include_path)
        try:
            out = simple_evaluate(model=lm, tasks=list(tasks), limit=limit, bootstrap_iters=0, log_samples=False,
                                  task_manager=manager)
        except (KeyError, FileNotFoundError, ConnectionError, OSError) as e:
            first = (str(e).splitlines() or [type(e).__name__])[0][:200]
            raise NewLLMError(f"lm-eval could not run {names or 'the tasks'} offline ({type(e).__name__}: {first}); "
                              "only tasks whose data is local (wikitext, --include-path tasks, the HF cache) run "
                              "here") from None
    return out["results"]
