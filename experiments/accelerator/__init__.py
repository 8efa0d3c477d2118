"""The parts of ``experiments/accelerator_check.py``: its plan, its phases and its report.

:mod:`~experiments.accelerator.plan` (targets, peaks, phase sizes and deadlines),
:mod:`~experiments.accelerator.phases` (what each phase measures) and
:mod:`~experiments.accelerator.report` (targets checked, ``report.md``, ``check.json``). The
script itself puts the carried dependencies on ``sys.path`` and runs the phases in order.
"""
