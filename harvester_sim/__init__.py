"""The harvester simulator: physics and faults, J1939 transmitter, NMEA GPS, and a real-time runner."""

from agent.decode.j1939_tp import Dtc
from harvester_sim.j1939_tx import J1939Transmitter, bam_frames, encode_dm1, generate_frames
from harvester_sim.nmea_tx import nmea_sentences
from harvester_sim.physics import DUTY_CYCLES, FAULTS, GpsFix, Harvester
from harvester_sim.runner import SimStats, Simulator, sim_from_config

__all__ = [
    "DUTY_CYCLES",
    "FAULTS",
    "Dtc",
    "GpsFix",
    "Harvester",
    "J1939Transmitter",
    "SimStats",
    "Simulator",
    "bam_frames",
    "encode_dm1",
    "generate_frames",
    "nmea_sentences",
    "sim_from_config",
]
