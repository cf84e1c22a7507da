"""A harvester's engine, cooling, hydraulics and fan, with switchable faults. Pure and seeded: no I/O, no clock.

Healthy ranges are shaped by the real J1939 traces in ../shared/data/can (John Deere 5055E: idle ~850-900 rpm,
run-ups to ~1250-2300 rpm, oil pressure 0-450 kPa rising with speed, coolant 30-90 °C from cold to warm):
idle 850-900 rpm, rated 2100-2250 rpm; warm coolant 84-95 °C; oil pressure ~230 kPa at idle, ~400 kPa at rated
speed; hydraulic oil 55-80 °C when the picking head is working.

Faults ramp in with `severity(t) = clip((t - onset) / ramp, 0, 1)`; at full severity:
- coolant_leak: coolant level falls to 60 %, pressure halves, cooling capacity drops: +10-25 °C at load.
- oil_pump_wear: oil pressure -25 % at idle to -40 % at rated speed; oil a few °C hotter.
- hydraulic_overheat: clogged oil cooler: hydraulic oil +15-30 °C, the fan asked for more.
- fan_wear: the fan slips 35 % below its demand, with a noisier speed; coolant and hydraulics warmer at load.
Temperatures follow first-order lags (coolant 40 s, oil 90 s, hydraulic 60 s), so a fault shows gradually.

Real operation, not only the field at working temperature (the model is trained on all of it):
- `start="warm"` begins in normal operation at working temperature (the default, and what the demo drives);
  `start="cold"` begins with everything at the ambient temperature and a crank: the warm-up is limited by the
  heat the engine makes (tens of minutes at idle, some minutes at load), as a real one is;
- duty `parked`: key on, engine mostly off (zero speed, load and oil pressure, the fan stopped, everything
  cooling towards ambient), started and idled now and then; every start is a crank;
- idling includes free revs (the John Deere traces rev to 1250-2300 rpm at standstill with load spikes to 100 %);
- `vary_fit=True` draws this machine's fits: idle speed 600-950 rpm (trucks idle lower than tractors), fan size
  and drive ratio, hydraulic cooler size, oil pump output (+-8 %).
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

from agent.decode.j1939_tp import Dtc

FAULTS: tuple[str, ...] = ("coolant_leak", "oil_pump_wear", "hydraulic_overheat", "fan_wear")
DUTY_CYCLES: tuple[str, ...] = ("harvest", "road", "idle", "mixed", "parked")
STARTS: tuple[str, ...] = ("warm", "cold")

THERMOSTAT_C = 86.0
FAN_MAX_RPM = 2400.0
RATED_RPM = 2200.0
M_PER_DEG_LAT = 111_320.0


@dataclass(frozen=True, slots=True)
class GpsFix:
    lat: float
    lon: float
    speed_kmh: float
    course_deg: float
    altitude_m: float
    fix_quality: int
    satellites: int
    hdop: float


@dataclass(frozen=True, slots=True)
class _Mode:
    name: str
    rpm: float
    load: float  # 0..1 engine load
    speed_kmh: float
    hyd_load: float  # 0..1 picking head / hydraulic demand
    duration_s: float


def _clip(x: float, lo: float, hi: float) -> float:
    return lo if x < lo else hi if x > hi else x


class Harvester:
    def __init__(
        self,
        seed: int = 0,
        fault: str | None = None,
        fault_onset_s: float = 0.0,
        fault_ramp_s: float = 600.0,
        duty: str = "harvest",
        ambient_c: float | None = None,
        start_lat: float = 28.05,
        start_lon: float = -81.95,
        start: str = "warm",
        vary_fit: bool = False,
    ) -> None:
        if fault is not None and fault not in FAULTS:
            raise ValueError(f"unknown fault {fault!r}; known: {', '.join(FAULTS)}")
        if duty not in DUTY_CYCLES:
            raise ValueError(f"unknown duty cycle {duty!r}; known: {', '.join(DUTY_CYCLES)}")
        if fault_ramp_s <= 0:
            raise ValueError("fault_ramp_s must be positive")
        if start not in STARTS:
            raise ValueError(f"unknown start {start!r}; known: {', '.join(STARTS)}")
        self.rng = random.Random(seed)
        # This machine's fits; the defaults are the machine the demo and the original training runs drove.
        fit = random.Random(seed * 7919 + 17)
        self.idle_rpm = fit.uniform(600, 950) if vary_fit else 875.0
        self.fan_max_rpm = fit.uniform(1900, 2900) if vary_fit else FAN_MAX_RPM
        self.hyd_cooler = fit.uniform(0.8, 1.25) if vary_fit else 1.0
        self.oil_pump = fit.uniform(0.92, 1.08) if vary_fit else 1.0
        self._crank_left = 0.0
        self.fault = fault
        self.onset = fault_onset_s
        self.ramp = fault_ramp_s
        self.duty = duty
        self.ambient = ambient_c if ambient_c is not None else self.rng.uniform(15.0, 35.0)
        self._t = 0.0
        self._mode = self._next_mode()
        self._mode_left = self._mode.duration_s
        self.rpm = self._mode.rpm
        self.load = self._mode.load
        self.speed = self._mode.speed_kmh
        self.hyd_load = self._mode.hyd_load
        self.pedal = self.load * 100
        self.hours = 1200.0 + self.rng.uniform(0, 800)
        self.fuel_temp = self.ambient + 15
        self.fan_slip_noise = 0.0
        if start == "warm":
            # At the equilibrium of the first mode: the run begins in normal operation.
            self.coolant, self.hyd, self.fan_rpm = THERMOSTAT_C, 65.0, 0.5 * self.fan_max_rpm
            for _ in range(20):  # fixed point of the coupled coolant / hydraulics / fan equilibria
                self.fan_rpm = self._fan_demand() * self.fan_max_rpm * (1 - 0.35 * self._sev("fan_wear"))
                self.coolant = self._coolant_eq()
                self.hyd = self._hyd_eq()
            self.oil_temp = self.coolant + 6 + 8 * self.load
        else:
            # Cold: the machine stood overnight; everything at ambient, and the first thing it does is crank.
            self.coolant = self.hyd = self.oil_temp = self.fuel_temp = self.ambient
            self.fan_rpm = 0.0
            self.rpm = self.load = self.speed = self.hyd_load = self.pedal = 0.0
            if self._mode.name != "off":
                self._crank_left = 2.5
        self._noise: dict[str, float] = {}
        self._dtc_active: dict[tuple[int, int], int] = {}
        self._dtc_count: dict[tuple[int, int], int] = {}
        # GPS: a serpentine through grove rows 300 m long, 6 m apart, running north-south.
        self.lat0, self.lon0 = start_lat, start_lon
        self.x = 0.0
        self.y = 0.0
        self.heading = 0.0
        self.row_dir = 1.0
        self.row_pos = 0.0

    # --- fault and mode ------------------------------------------------------------------------------------

    def severity(self, t: float | None = None) -> float:
        if self.fault is None:
            return 0.0
        t = self._t if t is None else t
        return _clip((t - self.onset) / self.ramp, 0.0, 1.0)

    def _sev(self, fault: str) -> float:
        return self.severity() if self.fault == fault else 0.0

    @property
    def running(self) -> bool:
        return self._mode.name != "off"

    def _idle(self) -> _Mode:
        r = self.rng
        if r.random() < 0.15:  # a free rev at standstill: short, with a load spike
            return _Mode("rev", r.uniform(1100, 2300), r.uniform(0.3, 1.0), 0.0, 0.0, r.uniform(3, 12))
        rpm = self.idle_rpm + r.uniform(-25, 25)
        return _Mode("idle", rpm, r.uniform(0.05, 0.18), 0.0, r.uniform(0.0, 0.1), r.uniform(60, 240))

    def _next_mode(self) -> _Mode:
        r = self.rng
        duty = self.duty
        if duty == "mixed":
            duty = r.choice(("harvest", "harvest", "road", "idle", "harvest", "harvest", "road", "idle", "parked"))
        if duty == "parked":  # begins off; after a stop comes a start, after idling another idle or a stop
            first = not hasattr(self, "_mode")
            if first or (self._mode.name != "off" and r.random() < 0.5):
                return _Mode("off", 0.0, 0.0, 0.0, 0.0, r.uniform(30, 300) if first else r.uniform(60, 600))
            return self._idle()
        if duty == "idle":
            return self._idle()
        if duty == "road":
            return _Mode(
                "road", r.uniform(1800, 2100), r.uniform(0.4, 0.65), r.uniform(20, 30), 0.05, r.uniform(60, 300)
            )
        # harvest: rows under load, headland turns, a pause to unload into the bin trailer now and then
        u = r.random()
        if u < 0.7:
            return _Mode(
                "row",
                r.uniform(2050, 2250),
                r.uniform(0.6, 0.9),
                r.uniform(2, 6),
                r.uniform(0.6, 0.95),
                r.uniform(40, 120),
            )
        if u < 0.9:
            return _Mode("turn", r.uniform(1700, 2000), r.uniform(0.35, 0.5), r.uniform(2, 4), 0.2, r.uniform(10, 25))
        return _Mode("unload", r.uniform(850, 950), r.uniform(0.1, 0.25), 0.0, 0.3, r.uniform(20, 60))

    # --- physics ---------------------------------------------------------------------------------------------

    def _cooling_capacity(self) -> float:
        fan = self.fan_rpm / self.fan_max_rpm
        air = 0.35 + 0.65 * fan + 0.01 * self.speed
        leak = 1.0 - 0.25 * self._sev("coolant_leak")
        return air * leak

    def _coolant_eq(self) -> float:
        heat = 18 + 62 * self.load * (0.6 + 0.4 * self.rpm / RATED_RPM)
        eq = self.ambient + heat / max(0.2, self._cooling_capacity())
        # The thermostat holds the engine near its set point until the radiator cannot keep up.
        return THERMOSTAT_C + 0.05 * (eq - THERMOSTAT_C) if eq < THERMOSTAT_C + 6 else eq - 6 + 0.3

    def _hyd_eq(self) -> float:
        fan = self.fan_rpm / self.fan_max_rpm
        cooler = (0.5 + 0.5 * fan) * self.hyd_cooler * (1.0 - 0.6 * self._sev("hydraulic_overheat"))
        return self.ambient + 18 + 30 * self.hyd_load / max(0.25, cooler)

    def _fan_demand(self) -> float:
        if not self.running:
            return 0.0  # the fan is driven by the engine
        d = 0.3 + 0.05 * (self.coolant - THERMOSTAT_C) + 0.012 * (self.hyd - 70)
        return _clip(d, 0.2, 1.0)

    @staticmethod
    def _warm(x: float, target: float, dt: float, tau: float, max_rate: float, cool_tau: float) -> float:
        """A first-order lag towards `target`, rising no faster than `max_rate` (°C/s: the heat there is to warm
        the mass with), falling with `cool_tau`."""
        if target > x:
            return x + min((1 - math.exp(-dt / tau)) * (target - x), max_rate * dt)
        return x + (1 - math.exp(-dt / cool_tau)) * (target - x)

    def _ou(self, key: str, sigma: float, dt: float, tau: float = 2.0) -> float:
        """Ornstein-Uhlenbeck noise: smooth, bounded, like a real sensor's wander."""
        x = self._noise.get(key, 0.0)
        x += -x * dt / tau + sigma * math.sqrt(2 * dt / tau) * self.rng.gauss(0, 1)
        self._noise[key] = x
        return x

    def step(self, dt: float) -> None:
        if dt <= 0:
            return
        self._t += dt
        self._mode_left -= dt
        if self._mode_left <= 0:
            self._mode = self._next_mode()
            self._mode_left = self._mode.duration_s
            if self._mode.name != "off" and self.rpm < 100:
                self._crank_left = 2.5  # a start: the starter turns the engine before it fires
        m = self._mode
        a = 1 - math.exp(-dt / 2.0)
        if self._crank_left > 0:
            self._crank_left -= dt
            self.rpm += (1 - math.exp(-dt / 0.5)) * (200 - self.rpm)
            self.load = 1.0  # the engine controller reports full load while cranking, as the tractor traces show
        elif not self.running:
            self.rpm += (1 - math.exp(-dt / 0.7)) * (0 - self.rpm)
            self.rpm = 0.0 if self.rpm < 5 else self.rpm
            self.load = 0.0
        else:
            self.rpm += a * (m.rpm - self.rpm)
            self.load += a * (m.load - self.load)
        self.speed += a * (m.speed_kmh - self.speed)
        self.hyd_load += a * (m.hyd_load - self.hyd_load)
        self.pedal = _clip(self.load * 100 + self._ou("pedal", 3, dt), 0, 100) if self.running else 0.0
        heat = 0.03 + 0.15 * self.load  # °C/s the engine can warm its coolant by
        target = self._coolant_eq() if self.running else self.ambient
        self.coolant = self._warm(self.coolant, target, dt, 40.0, heat, 40.0 if self.running else 1800.0)
        oil_eq = self.coolant + (6 + 8 * self.load + 6 * self._sev("oil_pump_wear") if self.running else 0.0)
        self.oil_temp = self._warm(self.oil_temp, oil_eq, dt, 90.0, heat, 90.0 if self.running else 1800.0)
        hyd_eq = self._hyd_eq() if self.running else self.ambient
        self.hyd = self._warm(self.hyd, hyd_eq, dt, 60.0, 0.05 + 0.3 * self.hyd_load, 60.0 if self.running else 900.0)
        self.fuel_temp += (1 - math.exp(-dt / 300.0)) * (self.ambient + 10 + 12 * self.load - self.fuel_temp)
        slip = 0.35 * self._sev("fan_wear")
        fan_target = self._fan_demand() * self.fan_max_rpm * (1 - slip)
        self.fan_rpm += (1 - math.exp(-dt / 3.0)) * (fan_target - self.fan_rpm)
        self.fan_slip_noise = self._ou("fan", 15 + 120 * self._sev("fan_wear"), dt, 1.0) if self.running else 0.0
        self.hours += dt / 3600
        self._move(dt)
        self._update_dtcs()

    def _move(self, dt: float) -> None:
        d = self.speed / 3.6 * dt
        if self._mode.name == "road":
            self.heading = 90.0
            self.x += d
            return
        self.row_pos += d
        if self.row_pos >= 300.0:
            self.row_pos = 0.0
            self.row_dir = -self.row_dir
            self.x += 6.0
        self.heading = 0.0 if self.row_dir > 0 else 180.0
        self.y += d * self.row_dir

    @property
    def t(self) -> float:
        return self._t

    # --- readings --------------------------------------------------------------------------------------------

    def oil_pressure(self) -> float:
        # Thicker when cold (up to +45 % at -15 °C), none below cranking speed.
        p = (120 + 130 * self.rpm / 1000) * _clip(1 - 0.004 * (self.oil_temp - 95), 0.7, 1.45)
        p *= self.oil_pump * _clip((self.rpm - 50) / 400, 0.0, 1.0)
        wear = self._sev("oil_pump_wear")
        return p * (1 - wear * (0.15 + 0.25 * self.rpm / RATED_RPM))

    def values(self) -> dict[str, float]:
        """Every signal of the project DBC, in engineering units, as the ECUs would report them now."""
        n = self._noise
        leak = self._sev("coolant_leak")
        rpm = max(0.0, self.rpm + n.get("rpm", 0.0)) if self.rpm > 0 else 0.0
        torque = _clip(self.load * 95 + n.get("pedal", 0.0), 0, 125) if self.rpm > 0 else 0.0
        return {
            "EEC1.EngTorqueMode": 0.0,
            "EEC1.DriversDemandEngPercentTorque": round(_clip(torque + 2, 0, 125)),
            "EEC1.ActualEngPercentTorque": round(torque),
            "EEC1.EngSpeed": rpm,
            "EEC1.SrcAddrssOfCtrllngDvcFrEngCntrl": 0.0,
            "EEC2.AccelPedalPos1": self.pedal,
            "EEC2.EngPercentLoadAtCurrentSpeed": round(_clip(self.load * 100, 0, 100)),
            "ET1.EngCoolantTemp": round(self.coolant + self._noise.get("ct", 0.0)),
            "ET1.EngFuelTemp1": round(self.fuel_temp),
            "ET1.EngOilTemp1": self.oil_temp,
            "EFL_P1.EngFuelDeliveryPress": 400 + 40 * self.load,
            "EFL_P1.EngOilLevel": 92.0,
            "EFL_P1.EngOilPress": max(0.0, self.oil_pressure() + n.get("op", 0.0) * min(1.0, self.rpm / 400)),
            "EFL_P1.EngCoolantPress": max(0.0, (60 + 0.6 * (self.coolant - 60)) * (1 - 0.5 * leak)),
            "EFL_P1.EngCoolantLevel": self.coolant_level(),
            "CCVS.WheelBasedVehicleSpeed": max(0.0, self.speed + n.get("spd", 0.0)),
            "LFE.EngFuelRate": (1.5 + 28 * self.load * rpm / RATED_RPM) if rpm > 0 else 0.0,
            "VF.HydTemp": round(self.hyd),
            "VF.HydOilLevel": 88.0,
            "FD.EstPercentFanSpeed": 100 * self._fan_demand(),
            "FD.FanDriveState": 1.0 if self.running else 0.0,
            "FD.FanSpeed": max(0.0, self.fan_rpm + self.fan_slip_noise),
            "AMB.BarometricPress": 101.0,
            "AMB.AmbientAirTemp": self.ambient,
            "HOURS.EngTotalHoursOfOperation": self.hours,
        }

    def sensor_noise(self, dt: float) -> None:
        """Advance the fast sensor noise (called by the transmitter at its own rate)."""
        self._ou("rpm", 12, dt, 0.5)
        self._ou("op", 6, dt, 1.0)
        self._ou("spd", 0.2, dt, 1.0)
        self._ou("ct", 0.3, dt, 5.0)

    def gps(self) -> GpsFix:
        lat = self.lat0 + self.y / M_PER_DEG_LAT
        lon = self.lon0 + self.x / (M_PER_DEG_LAT * math.cos(math.radians(self.lat0)))
        return GpsFix(lat, lon, max(0.0, self.speed), self.heading, 40.0, 1, 11, 0.9)

    # --- the engine's own diagnostics ------------------------------------------------------------------------

    def _update_dtcs(self) -> None:
        conds = {
            (110, 0): self.coolant > 105,
            (111, 1): self.coolant_level() < 70,
            (100, 1): self.rpm > 1200 and self.oil_pressure() < 200,
            (1638, 0): self.hyd > 95,
        }
        for key, on in conds.items():
            if on and key not in self._dtc_active:
                self._dtc_count[key] = min(126, self._dtc_count.get(key, 0) + 1)
                self._dtc_active[key] = self._dtc_count[key]
            elif not on and key in self._dtc_active:
                del self._dtc_active[key]

    def coolant_level(self) -> float:
        return 98.0 - 38.0 * self._sev("coolant_leak")

    def active_dtcs(self) -> list[Dtc]:
        return [Dtc(spn, fmi, oc) for (spn, fmi), oc in sorted(self._dtc_active.items())]
