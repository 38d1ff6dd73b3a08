"""Token-level loss and perplexity of a causal LM from per-sequence negative log-likelihoods.

Unlike the Hub's ``perplexity`` measurement, which loads a model by name, this module takes the
scores the recipe already computed: for each sequence the summed NLL of its predicted tokens and
how many tokens that is. loss = sum(nll) / sum(tokens); perplexity = exp(loss).
"""

import math

import datasets
import evaluate

_DESCRIPTION = "Perplexity = exp(total negative log-likelihood / total predicted tokens)."
_KWARGS_DESCRIPTION = """
Args:
    nll_sum (list of float): summed negative log-likelihood (natural log) of each sequence's predicted tokens.
    num_tokens (list of int): number of predicted tokens of each sequence.
Returns:
    loss (float): mean NLL per token.
    perplexity (float): exp(loss).
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class Perplexity(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="",
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features({"nll_sum": datasets.Value("float64"), "num_tokens": datasets.Value("int64")}),
        )

    def _compute(self, nll_sum, num_tokens):
        tokens = sum(num_tokens)
        loss = sum(nll_sum) / tokens if tokens else float("nan")
        return {"loss": loss, "perplexity": math.exp(loss) if tokens else float("nan")}
