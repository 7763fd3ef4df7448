"""LLaVA-style instruction generation: context, prompts, backends, parsing and the stages."""

from generators.instruct.absent import AbsentObjects
from generators.instruct.stage import BriefDescriptions, InstructGenerate

__all__ = ["AbsentObjects", "BriefDescriptions", "InstructGenerate"]
