"""Evaluation: teacher-student agreement (`linmu.eval.agreement`, `linmu eval --agreement`) and the lmms-eval model
plugin (`linmu.eval.lmms_plugin`, ``lmms-eval --model linmu``; needs the ``eval`` extra). Importing this package
imports neither lmms-eval nor the models."""
