"""SR-TTT: test-time learning from one failure (detect -> reflect -> diversify -> train -> commit/verify).

Pure torch/numpy; the Ray layer passes its store and key-store clients to `apply_edit` / `rollback`.
Submodules are imported lazily by their users (`from srmoa_dist.ttt.edit import apply_edit`); this
package only re-exports the light, model-free names.
"""

from srmoa_dist.ttt.detect import (
    Failure,
    NumericAnswerChecker,
    Verdict,
    Verifier,
    answer_matches,
    detect,
    explicit_failure,
    get_verifier,
    register_verifier,
)
from srmoa_dist.ttt.diversify import STRUCTURES, HeldOutLeak, TrainingPrompt, diversify
from srmoa_dist.ttt.ledger import EditLedger, EditRecord
from srmoa_dist.ttt.reflect import RuleRejected, reflect

__all__ = [
    "Failure", "NumericAnswerChecker", "Verdict", "Verifier", "answer_matches", "detect", "explicit_failure",
    "get_verifier", "register_verifier", "STRUCTURES", "HeldOutLeak", "TrainingPrompt", "diversify",
    "EditLedger", "EditRecord", "RuleRejected", "reflect",
]
