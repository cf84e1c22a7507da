"""The harvester simulator: physics and faults, J1939 transmitter, NMEA GPS, and a real-time runner."""

from agent.decode.j1939_tp import Dtc
from harvester_sim.j1939_tx import (
    SIM_ENGINE_NAME,
    J1939Transmitter,
    address_claim_frame,
    bam_frames,
    dm_frames,
    encode_dm1,
    generate_frames,
    make_name,
)
from harvester_sim.nmea_tx import nmea_sentences
from harvester_sim.physics import DUTY_CYCLES, FAULTS, GpsFix, Harvester
from harvester_sim.runner import SimStats, Simulator, sim_from_config

__all__ = [
    "DUTY_CYCLES",
    "FAULTS",
    "SIM_ENGINE_NAME",
    "Dtc",
    "GpsFix",
    "Harvester",
    "J1939Transmitter",
    "SimStats",
    "Simulator",
    "address_claim_frame",
    "bam_frames",
    "dm_frames",
    "encode_dm1",
    "generate_frames",
    "make_name",
    "nmea_sentences",
    "sim_from_config",
]
