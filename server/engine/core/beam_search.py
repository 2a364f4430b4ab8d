"""Beam search of one request: after every step, rank its beams' continuations as transformers does.

The engine runs the beams of a request as ordinary scheduled requests (one row each in the step's
batch, next to everyone else's rows). Each beam row yields its most likely next tokens; once every
running beam has them, `BeamSearch.step` ranks all continuations and says which beams continue:

    running beams (k)       candidates (K = max(2, 1 + #stop ids) x k, best first)     next running beams
    b0 "the cat"  ──┐       b0+" sat" -1.2  ─────────────────────────────────────────▶ b0' = b0+" sat"
    b1 "the dog"  ──┴─▶     b1+<eos>  -1.5  ──▶ finished (top k ranks only), scored
                            b0+" ran" -1.9  ─────────────────────────────────────────▶ b1' = b0+" ran"
                            ...                                                         (b1 is pruned)

This mirrors `GenerationMixin._beam_search` of transformers 5 (do_sample=False):
- a running beam's score is the sum of its tokens' logprobs; candidates are the top K of
  score + logprob over all beams and the vocabulary;
- a candidate that ends (a stop id, or max_tokens reached) among the first k ranks becomes a finished
  hypothesis scored sum(logprobs) / num_generated_tokens ** length_penalty; the best k are kept;
- the best k candidates that did not end are the next running beams;
- early_stopping True ends the search once k hypotheses are finished; False and "never" end it when
  the best running beam can no longer beat the worst finished one, estimating its final score at
  its current length ("never" with length_penalty > 0: at max_tokens);
- the search also ends when every candidate ended (max_tokens).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from server.engine.outputs import FinishReason, TokenLogprob
from server.engine.sampling_params import BeamSearchParams
from server.engine.step_plan import BeamCandidates


@dataclass(slots=True)
class Beam:
    """A running beam: what it generated and its score so far."""

    token_ids: list[int] = field(default_factory=list)  # generated tokens, without the prompt
    cumulative_logprob: float = 0.0  # sum of the logprobs of token_ids
    logprobs: list[TokenLogprob] = field(default_factory=list)  # one per token when logprobs were asked for


@dataclass(slots=True)
class FinishedBeam:
    """A finished hypothesis, one of the request's possible answers."""

    token_ids: list[int]  # generated tokens, the stop id included when it ended on one
    logprobs: list[TokenLogprob]  # one per token when logprobs were asked for, else empty
    cumulative_logprob: float  # sum of the tokens' logprobs
    score: float  # cumulative_logprob / len(token_ids) ** length_penalty (transformers' sequences_scores)
    finish_reason: FinishReason  # STOP (ended on a stop id) or LENGTH (max_tokens)


@dataclass(slots=True)
class BeamChild:
    """A running beam of the next step: a running beam of this step plus one token."""

    parent: int  # index of the beam it continues, among this step's running beams
    token_id: int  # the token it appends


@dataclass(slots=True)
class _Candidate:
    score: float  # the parent's cumulative logprob plus logprob
    parent: int  # index of the parent beam
    token_id: int  # the continuation
    logprob: float  # its logprob under the parent


class BeamSearch:
    """The ranking state of one beam search request (no tensors, no KV: the engine applies the result)."""

    def __init__(self, params: BeamSearchParams, max_tokens: int, stop_token_ids: set[int], num_logprobs: int | None):
        """Start with one running beam (the prompt alone).

        Args:
            params: beam width, returned beams, length_penalty, early_stopping.
            max_tokens: tokens a beam may generate (a beam reaching it ends with "length").
            stop_token_ids: ids that end a beam (EOS and stop_token_ids).
            num_logprobs: top alternatives to record per token, or None for no logprobs.
        """
        self.params = params
        self.max_tokens = max_tokens
        self.stop_token_ids = set(stop_token_ids)
        self.num_logprobs = num_logprobs
        self.beams: list[Beam] = [Beam()]  # running beams, best first (one before the first step)
        self.finished: list[FinishedBeam] = []  # at most num_beams, best first
        self.is_done = False
        self._can_improve = True  # transformers' is_early_stop_heuristic_unsatisfied (once False, stays False)

    @property
    def num_candidates(self) -> int:
        """Continuations kept per step (and needed from each beam row): enough that k of them never end."""
        return self.params.num_candidates(len(self.stop_token_ids))

    def best(self) -> list[FinishedBeam]:
        """The num_return best finished beams, best first."""
        return self.finished[: self.params.num_return]

    def step(self, candidates: list[BeamCandidates]) -> list[BeamChild]:
        """Rank this step's continuations, record the ones that finished, choose the next running beams.

        Args:
            candidates: one per running beam, in the order of `self.beams`.

        Returns:
            The next running beams (num_beams of them), or an empty list when the search is done.
        """
        assert not self.is_done and len(candidates) == len(self.beams)
        ranked = self._rank(candidates)
        num_generated = len(self.beams[0].token_ids) + 1
        ended = [c.token_id in self.stop_token_ids or num_generated >= self.max_tokens for c in ranked]
        self._add_finished(ranked, ended, num_generated, candidates)
        running = [c for c, end in zip(ranked, ended) if not end][: self.params.num_beams]
        self._update_can_improve(running, num_generated)
        full = len(self.finished) == self.params.num_beams
        if all(ended) or not running or not self._can_improve or (full and self.params.early_stopping is True):
            self.is_done = True
            self.beams = []
            return []
        self.beams = [self._extend(self.beams[c.parent], c, candidates[c.parent]) for c in running]
        return [BeamChild(parent=c.parent, token_id=c.token_id) for c in running]

    def _rank(self, candidates: list[BeamCandidates]) -> list[_Candidate]:
        """The num_candidates best (score + logprob) continuations over all beams, best first."""
        width = self.num_candidates
        pool = [
            _Candidate(beam.cumulative_logprob + logprob, parent, token_id, logprob)
            for parent, (beam, row) in enumerate(zip(self.beams, candidates))
            for token_id, logprob in zip(row.token_ids[:width], row.logprobs[:width])
        ]
        pool.sort(key=lambda c: -c.score)  # stable: ties keep beam order, then the row's order
        return pool[:width]

    def _add_finished(
        self, ranked: list[_Candidate], ended: list[bool], num_generated: int, candidates: list[BeamCandidates]
    ) -> None:
        """Merge the top num_beams ranks that ended into the finished hypotheses (when still allowed)."""
        k = self.params.num_beams
        if not self._can_improve or (len(self.finished) == k and self.params.early_stopping is True):
            return
        new = []
        for candidate, end in list(zip(ranked, ended))[:k]:
            if not end:
                continue
            parent = self.beams[candidate.parent]
            new.append(FinishedBeam(
                token_ids=parent.token_ids + [candidate.token_id],
                logprobs=parent.logprobs + self._token_logprob(candidate, candidates[candidate.parent]),
                cumulative_logprob=candidate.score,
                score=candidate.score / num_generated ** self.params.length_penalty,
                finish_reason=FinishReason.STOP if candidate.token_id in self.stop_token_ids else FinishReason.LENGTH,
            ))
        self.finished = sorted(self.finished + new, key=lambda f: -f.score)[:k]  # stable: earlier ones win ties

    def _update_can_improve(self, running: list[_Candidate], num_generated: int) -> None:
        """Whether the best running beam could still beat the worst finished one (transformers' heuristic)."""
        if not self._can_improve or len(self.finished) < self.params.num_beams or not running:
            return
        penalty = self.params.length_penalty
        length = self.max_tokens if self.params.early_stopping == "never" and penalty > 0 else num_generated
        best_possible = running[0].score / length**penalty
        self._can_improve = best_possible > min(f.score for f in self.finished)

    def _extend(self, parent: Beam, candidate: _Candidate, row: BeamCandidates) -> Beam:
        return Beam(
            token_ids=parent.token_ids + [candidate.token_id],
            cumulative_logprob=candidate.score,
            logprobs=parent.logprobs + self._token_logprob(candidate, row),
        )

    def _token_logprob(self, candidate: _Candidate, row: BeamCandidates) -> list[TokenLogprob]:
        """[the logprob record of the candidate's token], or [] when logprobs were not asked for."""
        if self.num_logprobs is None:
            return []
        top = {}
        if self.num_logprobs:
            top = dict(zip(row.token_ids[: self.num_logprobs], row.logprobs[: self.num_logprobs]))
        return [TokenLogprob(token_id=candidate.token_id, logprob=candidate.logprob, top=top)]
