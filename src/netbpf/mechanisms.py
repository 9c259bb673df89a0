# SPDX-License-Identifier: MIT
"""Alternative programs chosen by what the running kernel accepts, never by its version.

What a verifier trusts is a property of the kernel build, not of its version number: the same
6.18.44 accepts a program on one build and refuses it on the next. So a tool's object carries,
for some jobs, several programs that do the job in different ways (a Choice, preferred first),
and load() keeps the first of each that the verifier accepts. NETBPF_REFUSE=name,name (names of
Alternatives) treats those as refused without trying them: every fallback can be tested on any
kernel."""

import dataclasses
import os

from .errors import MissingFeatureError, VerifierError, strerror

REFUSE_ENV = "NETBPF_REFUSE"


@dataclasses.dataclass(frozen=True)
class Alternative:
    name: str     # as status and NETBPF_REFUSE name it: "iter/task_file"
    program: str  # the program of the object that does it


@dataclasses.dataclass(frozen=True)
class Choice:
    job: str                                # what the alternatives do: "sweep"
    alternatives: tuple                     # of Alternative, preferred first
    required: bool = True                   # False: the tool can do without any of them


def forced_refusals():
    """The alternatives NETBPF_REFUSE names."""
    return {name.strip() for name in os.environ.get(REFUSE_ENV, "").split(",") if name.strip()}


def load(open_object, choices, tool):
    """open_object() -> a fresh, prepared (unloaded) Object. Load it with the first alternative of
    each choice the kernel accepts; returns (the loaded Object, {job: the Alternative in use, or
    None}, {alternative name: why it is not in use}). A refused program of no choice raises its
    VerifierError; a required job without any alternative left raises MissingFeatureError."""
    refused = {alt.name: f"refused by {REFUSE_ENV}" for choice in choices for alt in choice.alternatives
               if alt.name in forced_refusals()}
    while True:
        chosen = {choice.job: next((alt for alt in choice.alternatives if alt.name not in refused), None)
                  for choice in choices}
        for choice in choices:
            if choice.required and chosen[choice.job] is None:
                why = "; ".join(f"{alt.name}: {refused[alt.name]}" for alt in choice.alternatives)
                raise MissingFeatureError(f"{tool}: this kernel takes no {choice.job} program ({why})")
        obj = open_object()
        try:
            for choice in choices:
                for alt in choice.alternatives:
                    obj.programs[alt.program].set_autoload(alt == chosen[choice.job])
            obj.load()
            return obj, chosen, refused
        except VerifierError as exc:
            obj.close()
            failed = next((alt for alt in chosen.values() if alt and alt.program == exc.program), None)
            if failed is None:
                raise
            refused[failed.name] = (f"verifier: {exc.reason or exc.strerror}" if exc.verified
                                    else f"load refused before the verifier ran: {strerror(exc.errno)}")
        except BaseException:
            obj.close()
            raise
