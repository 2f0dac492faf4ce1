"""Settings from the environment, the secrets rules, and `dicom-gateway config`."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from gateway.settings import Settings, SettingsError


def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    for name in list(os.environ):
        if name.startswith("DICOM_GATEWAY_"):
            monkeypatch.delenv(name)


def test_nested_settings_come_from_prefixed_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    _clean_env(monkeypatch)
    monkeypatch.setenv("DICOM_GATEWAY_DICOM__PORT", "104")
    monkeypatch.setenv("DICOM_GATEWAY_DICOM__ALLOWED_NETWORKS", '["10.0.0.0/8"]')
    monkeypatch.setenv("DICOM_GATEWAY_OBJECT_STORE__S3__BUCKET", "imaging")
    settings = Settings()
    assert settings.dicom.port == 104
    assert settings.dicom.allowed_networks == ["10.0.0.0/8"]
    assert settings.object_store.s3.bucket == "imaging"
    assert settings.dicom.ae_title == "DICOMGATEWAY" and settings.http.port == 8000


def test_missing_or_weak_secrets_are_refused(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    _clean_env(monkeypatch)
    monkeypatch.setenv("DICOM_GATEWAY_DATA_DIR", str(tmp_path))
    with pytest.raises(SettingsError):
        Settings().pseudonym_secret_value()
    monkeypatch.setenv("DICOM_GATEWAY_ADMIN_TOKEN", "changeme")
    with pytest.raises(SettingsError):
        Settings().admin_token_value()
    # The example configurations' placeholders are long enough, and still refused.
    examples = Path(__file__).resolve().parents[2] / "deploy" / "config"
    placeholders = [line.split("=", 1)[1] for path in examples.glob("*.env")
                    for line in path.read_text().splitlines()
                    if line.startswith(("DICOM_GATEWAY_ADMIN_TOKEN=", "DICOM_GATEWAY_PSEUDONYM_SECRET="))]
    assert placeholders
    for value in placeholders:
        monkeypatch.setenv("DICOM_GATEWAY_ADMIN_TOKEN", value)
        with pytest.raises(SettingsError, match="placeholder"):
            Settings().admin_token_value()
    monkeypatch.setenv("DICOM_GATEWAY_ADMIN_TOKEN", "k3J9x-Qv7Lr2Tz8Wm4Np")
    assert Settings().admin_token_value() == "k3J9x-Qv7Lr2Tz8Wm4Np"


def test_serve_generates_secrets_once_with_private_permissions(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
) -> None:
    _clean_env(monkeypatch)
    settings = Settings(data_dir=tmp_path)
    settings.ensure_generated_secrets()
    first = settings.admin_token_value()
    settings.ensure_generated_secrets()
    assert Settings(data_dir=tmp_path).admin_token_value() == first
    assert len(settings.pseudonym_secret_value()) >= 32
    assert (tmp_path / "secrets.json").stat().st_mode & 0o777 == 0o600


def test_invalid_ae_title_is_rejected(monkeypatch: pytest.MonkeyPatch) -> None:
    _clean_env(monkeypatch)
    monkeypatch.setenv("DICOM_GATEWAY_DICOM__AE_TITLE", "A" * 17)
    with pytest.raises(ValueError):
        Settings()


def test_config_command_masks_secrets(tmp_path: Path) -> None:
    token = "very-secret-admin-token-0123456789"
    env = {"DICOM_GATEWAY_ADMIN_TOKEN": token, "DICOM_GATEWAY_DATA_DIR": str(tmp_path),
           "DICOM_GATEWAY_DATABASE_URL": "postgresql://gw:db-password-42@db/gw",
           "PATH": "/usr/bin:/bin"}
    result = subprocess.run([sys.executable, "-m", "gateway", "config"], env=env,
                            capture_output=True, text=True, timeout=60, check=True)
    assert token not in result.stdout and "db-password-42" not in result.stdout
    shown = json.loads(result.stdout)
    assert shown["admin_token"] == "**********"
    assert shown["database_url"] == "postgresql://gw:**********@db/gw"
    assert shown["dicom"]["port"] == 11112


def test_cli_reports_a_missing_secret_without_a_traceback(tmp_path: Path) -> None:
    env = {"DICOM_GATEWAY_DATA_DIR": str(tmp_path), "PATH": "/usr/bin:/bin"}
    result = subprocess.run([sys.executable, "-m", "gateway", "api"], env=env,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert "DICOM_GATEWAY_ADMIN_TOKEN" in result.stderr and "Traceback" not in result.stderr


def test_dicom_callers_map_ae_titles_to_sites_and_rights(monkeypatch: pytest.MonkeyPatch) -> None:
    from dicom_node import Right
    from gateway.components import caller_policy
    from storage import AccessScope

    monkeypatch.setenv("DICOM_GATEWAY_DICOM__CALLERS", json.dumps({
        "PACS_A": {"sites": ["siteA"], "rights": ["find", "get"]},
        "REGION": {"sites": ["*"], "rights": ["find", "move"], "move_destinations": ["ARCHIVE"]}}))
    monkeypatch.setenv("DICOM_GATEWAY_DICOM__MOVE_DESTINATIONS",
                       '{"ARCHIVE": {"host": "10.0.0.5", "port": 104}}')
    monkeypatch.setenv("DICOM_GATEWAY_DICOM__UNLISTED_CALLER", '{"rights": ["store"]}')
    monkeypatch.setenv("DICOM_GATEWAY_DICOM__CALLING_AE_SITES", '{"CT_B": "siteB"}')
    policy = caller_policy(Settings())
    pacs = policy.caller("PACS_A ", "10.1.2.3", "site1")
    assert pacs.scope == AccessScope(site_ids=frozenset({"siteA"}))
    assert pacs.rights == {Right.FIND, Right.GET} and pacs.actor == "ae:PACS_A"
    region = policy.caller("REGION", "10.1.2.4", "site1")
    assert region.scope == AccessScope() and region.may_move_to("ARCHIVE")
    assert not region.may_move_to("ELSEWHERE")
    unlisted = policy.caller("CT_B", "10.1.2.5", "siteB")
    assert unlisted.site_ids == {"siteB"} and unlisted.rights == {Right.STORE}


def test_default_unlisted_caller_has_every_right_on_its_own_site_only() -> None:
    from dicom_node import ALL_RIGHTS
    from gateway.components import caller_policy

    caller = caller_policy(Settings()).caller("FINDSCU", "127.0.0.1", "site1")
    assert caller.rights == ALL_RIGHTS and caller.site_ids == {"site1"} and not caller.listed


@pytest.mark.parametrize("callers, message", [
    ({"A": {"sites": []}}, "at least 1"),
    ({"A": {"sites": ["site 1"]}}, "not a site id"),
    ({"A": {"sites": ["*", "siteA"]}}, "not both"),
    ({"A": {"sites": ["siteA"], "rights": ["delete"]}}, "rights"),
])
def test_invalid_dicom_callers_are_refused(monkeypatch: pytest.MonkeyPatch, callers: object,
                                           message: str) -> None:
    monkeypatch.setenv("DICOM_GATEWAY_DICOM__CALLERS", json.dumps(callers))
    with pytest.raises(ValueError, match=message):
        Settings()


def test_caller_settings_that_cannot_be_enforced_are_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    from gateway.components import caller_policy

    monkeypatch.setenv("DICOM_GATEWAY_DICOM__CALLERS", json.dumps(
        {"A": {"sites": ["siteA"], "certificate_subject": "CN=pacs-a"}}))
    with pytest.raises(SettingsError, match="TLS"):
        caller_policy(Settings())
    monkeypatch.setenv("DICOM_GATEWAY_DICOM__CALLERS", json.dumps(
        {"A": {"sites": ["siteA"], "move_destinations": ["NOWHERE"]}}))
    with pytest.raises(SettingsError, match="NOWHERE"):
        caller_policy(Settings())


def test_regional_api_refuses_to_hold_the_pseudonymization_secret(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    _clean_env(monkeypatch)
    monkeypatch.setenv("DICOM_GATEWAY_DATA_DIR", str(tmp_path))
    monkeypatch.setenv("DICOM_GATEWAY_HTTP__ROLE", "region")
    Settings().check_role()  # without the secret: fine
    monkeypatch.setenv("DICOM_GATEWAY_PSEUDONYM_SECRET", "a-real-looking-secret-0123456789")
    with pytest.raises(SettingsError, match="must run without the pseudonymization secret"):
        Settings().check_role()
    monkeypatch.delenv("DICOM_GATEWAY_PSEUDONYM_SECRET")
    (tmp_path / "secrets.json").write_text(json.dumps({"pseudonym_secret": "stored-secret-0123456789"}))
    with pytest.raises(SettingsError, match="secrets.json holds a pseudonym_secret"):
        Settings().check_role()
    monkeypatch.setenv("DICOM_GATEWAY_HTTP__ROLE", "site")
    Settings().check_role()  # a site's API holds it...
    (tmp_path / "secrets.json").unlink()
    with pytest.raises(SettingsError, match="set DICOM_GATEWAY_HTTP__ROLE=region"):
        Settings().check_role()  # ...and must: without it, it is a regional API unaware
    monkeypatch.setenv("DICOM_GATEWAY_HTTP__ROLE", "neither")
    with pytest.raises(ValueError, match="role"):
        Settings()


def test_api_command_with_role_region_and_a_secret_exits_with_the_reason(tmp_path: Path) -> None:
    import os

    env = {"DICOM_GATEWAY_DATA_DIR": str(tmp_path), "PATH": "/usr/bin:/bin",
           "PYTHONPATH": os.environ.get("PYTHONPATH", ""),
           "DICOM_GATEWAY_ADMIN_TOKEN": "a-real-looking-admin-token-0123456789",
           "DICOM_GATEWAY_PSEUDONYM_SECRET": "a-real-looking-secret-0123456789",
           "DICOM_GATEWAY_HTTP__ROLE": "region", "DICOM_GATEWAY_HTTP__PORT": "0"}
    result = subprocess.run([sys.executable, "-m", "gateway", "api"], env=env,
                            capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 2, result.stderr
    assert "HTTP__ROLE=region" in result.stderr and "Traceback" not in result.stderr
    assert "a-real-looking-secret" not in result.stderr + result.stdout


def test_serve_banner_prints_a_generated_admin_token_but_never_one_the_operator_set(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from gateway.supervisor import Supervisor

    _clean_env(monkeypatch)
    monkeypatch.setenv("DICOM_GATEWAY_DATA_DIR", str(tmp_path))
    generated = Settings()
    generated.ensure_generated_secrets()
    Supervisor(generated)._banner(generated.admin_token_value())
    assert f"Admin token   : {generated.admin_token_value()}" in capsys.readouterr().out
    monkeypatch.setenv("DICOM_GATEWAY_ADMIN_TOKEN", "operator-set-admin-token-0123456789")
    configured = Settings()
    Supervisor(configured)._banner(configured.admin_token_value())
    out = capsys.readouterr().out
    assert "operator-set-admin-token" not in out and "(DICOM_GATEWAY_ADMIN_TOKEN)" in out


def test_ins_issuers_are_oids_and_namespaces(monkeypatch: pytest.MonkeyPatch) -> None:
    from gateway.components import ins_issuers

    _clean_env(monkeypatch)
    default = ins_issuers(Settings())
    assert "1.2.250.1.213.1.4.10" in default.oids and "ASIP-SANTE-INS-NIR" in default.namespaces
    monkeypatch.setenv("DICOM_GATEWAY_INS__OIDS", '["1.2.250.1.213.1.4.8"]')
    monkeypatch.setenv("DICOM_GATEWAY_INS__NAMESPACES", '["ASIP-SANTE-INS-NIR"]')
    configured = ins_issuers(Settings())
    assert configured.oids == {"1.2.250.1.213.1.4.8"}
    assert configured.namespaces == {"ASIP-SANTE-INS-NIR"}
    monkeypatch.setenv("DICOM_GATEWAY_INS__OIDS", '["ASIP-SANTE-INS-NIA"]')
    with pytest.raises(ValueError, match="INS__NAMESPACES"):  # a namespace among the OIDs
        Settings()


def test_the_former_ins_issuer_setting_still_works_split_by_what_it_held(
        monkeypatch: pytest.MonkeyPatch) -> None:
    from gateway.components import ins_issuers

    _clean_env(monkeypatch)
    monkeypatch.setenv("DICOM_GATEWAY_INS_ISSUER_OIDS", '["1.2.250.1.213.1.4.8", "MY-INS-NS"]')
    with pytest.warns(DeprecationWarning, match="INS__OIDS"):
        settings = Settings()
    issuers = ins_issuers(settings)
    assert issuers.oids == {"1.2.250.1.213.1.4.8"} and issuers.namespaces == {"MY-INS-NS"}
    # as the CLI re-validates its settings (flags on top): the same, no second conversion
    assert ins_issuers(Settings.model_validate(settings.model_dump())) == issuers
    monkeypatch.setenv("DICOM_GATEWAY_INS__OIDS", '["1.2.250.1.213.1.4.9"]')
    with pytest.raises(ValueError, match="deprecated"):  # both: which one meant?
        Settings()


def test_cleaned_descriptors_setting_reaches_the_policy(monkeypatch: pytest.MonkeyPatch) -> None:
    from anonymize import READING_DESCRIPTORS, ProfileOption
    from gateway.components import build_policy

    _clean_env(monkeypatch)
    monkeypatch.setenv("DICOM_GATEWAY_PSEUDONYM_SECRET", "s" * 40)
    policy = build_policy(Settings())
    assert ProfileOption.CLEAN_DESCRIPTORS in policy.options
    assert policy.cleaned_descriptors == READING_DESCRIPTORS
    monkeypatch.setenv("DICOM_GATEWAY_DEID__CLEANED_DESCRIPTORS", '["all"]')
    assert build_policy(Settings()).cleaned_descriptors is None
    monkeypatch.setenv("DICOM_GATEWAY_DEID__CLEANED_DESCRIPTORS", '["StudyDescription", "PatientName"]')
    with pytest.raises(SettingsError, match="PatientName"):
        build_policy(Settings())
