"""The scorer contract lives in contracts.py (Scorer); re-exported here so that
`sparsevlm_exp.scorers.base.Scorer` keeps working."""
from ..contracts import Scorer

__all__ = ["Scorer"]
