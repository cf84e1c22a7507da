"""Model updates on the vehicle (docs/model_updates.md, "Vehicle"): a signed package (harvester_common/modelpkg.py)
is checked here before any model it carries may score (`verify.py`); the model directory (`modeldir.py`), the
resumable download (`download.py`), the shadow run's figures and decision (`shadow.py`, pure) and the state machine
that drives them (`manager.py`).

This package never imports agent.service (which runs it): what it needs from the running agent, such as the
signals its decoders produce, is handed in.
"""
