"""The receiving doctor's context in the viewer (Chromium, Playwright): the site's sealed
context read only in the browser with the link's key, patients grouped and never mixed,
dates shifted said, and a report series read as a report whose cited image opens."""

from __future__ import annotations

from collections.abc import Iterator
from io import BytesIO
from pathlib import Path
from typing import Any

import httpx
import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence
from sqlalchemy import text

from gateway.importer import run_import
from gateway.sample_study import PlantedIdentity, SampleStudySpec, write_sample_study
from spool import Spool
from storage import StudyQuery
from tests.e2e.test_viewer import ADMIN, ARTIFACTS, CHROMIUM, _first_image, browser
from tests.support.dicomweb_server import DicomwebServer
from tests.support.services import wait_for
from tests.support.writeback import (
    basic_text_sr,
    encapsulated_pdf,
    presentation_state,
    segmentation,
    stow,
)
from access.sealed_context import seal, unseal

__all__ = ["browser"]  # the viewer tests' fixture, used here
CONTEXT = {"patient_name": "DUPONT^Marie", "patient_birth_date": "1961-04-02",
           "exam_date": "2026-03-01", "clinical_question": "Nodule pulmonaire ? Comparer."}


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DicomwebServer]:
    if not Path(CHROMIUM).exists():
        pytest.fail("Debian's chromium is missing: make test installs it (apt-get install chromium)")
    root = tmp_path_factory.mktemp("viewer-context")
    with DicomwebServer(root, studies=2) as running:
        # Another patient (another INS): a share of both covers two patients.
        other = write_sample_study(root / "other-patient", SampleStudySpec(
            ct_slices=3, mr_slices=0, ct_size=64, seed=77, identity=PlantedIdentity(
                patient_name="MARTIN^JEAN", patient_id="IPP-9000", ins="285057512345623",
                accession_number="ACC-OTHER-1", study_date="20260301")))
        run_import(other, running.pipeline, Spool(root / "spool", "site1"))
        yield running


@pytest.fixture
def context(browser: Any, request: pytest.FixtureRequest) -> Iterator[Any]:
    opened = browser.new_context(locale="fr-FR", viewport={"width": 1280, "height": 800})
    sent: list[str] = []  # everything the browser sent: URLs, headers, bodies
    opened.on("request", lambda r: sent.append(
        f"{r.url} {r.headers} {r.post_data or ''}"))
    opened.sent = sent
    yield opened
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    for number, page in enumerate(opened.pages):
        page.screenshot(path=str(ARTIFACTS / f"{request.node.name}-{number}.png"))
    opened.close()


def _watched(page: Any) -> Any:
    problems: list[str] = []
    page.on("console", lambda m: problems.append(m.text) if m.type == "error" else None)
    page.on("pageerror", lambda e: problems.append(str(e)))
    page.problems = problems
    return page


def _studies(server: DicomwebServer) -> list[str]:
    return sorted(s.study_instance_uid for s in server.index.search_studies(StudyQuery()))


def _share(server: DicomwebServer, studies: list[str], **body: object) -> dict[str, str]:
    answer = httpx.post(f"{server.root}/api/shares", headers=ADMIN,
                        json={"study_uids": studies, "expires_in": 3600, **body})
    assert answer.status_code == 201, answer.text
    return answer.json()


def test_the_sites_sealed_context_is_read_in_the_browser_and_nowhere_else(
        server: DicomwebServer, context: Any) -> None:
    sealed, key = seal(CONTEXT)
    assert unseal(sealed, key) == CONTEXT
    created = _share(server, _studies(server)[:1], pin="975310", sealed_context=sealed)
    # The index holds the ciphertext only, and the API never shows more than that it exists.
    with server.index.engine.connect() as connection:
        row = connection.execute(text("SELECT * FROM shares WHERE share_id = :i"),
                                 {"i": created["id"]}).one()
    assert row.sealed_context == sealed and "DUPONT" not in repr(tuple(row))
    described = httpx.get(f"{server.root}/api/shares/{created['id']}", headers=ADMIN).json()
    assert described["has_sealed_context"] is True and "DUPONT" not in str(described)
    refused = httpx.post(f"{server.root}/api/shares", headers=ADMIN, json={
        "study_uids": _studies(server)[:1], "expires_in": 60,
        "sealed_context": '{"patient_name": "DUPONT^Marie"}'})
    assert refused.status_code == 400 and "sealed_context" in refused.json()["error"]["message"]

    page = _watched(context.new_page())
    page.goto(f"{created['url']}#k={key}")
    page.fill("input[name=pin]", "975310")
    page.click("button[type=submit]")  # the answer is a redirect: the fragment is not carried
    _first_image(page)
    box = page.locator(".context")
    box.locator("dd").first.wait_for()
    shown = box.inner_text()
    for expected in ("Nom", "DUPONT Marie", "Date de naissance", "1961-04-02",
                     "Date réelle de l'examen", "2026-03-01", "Nodule pulmonaire ? Comparer."):
        assert expected in shown, shown
    page.click("text=English")  # another page of the same tab: the key was kept in it
    _first_image(page)
    page.locator(".context dd").first.wait_for()
    assert "Name" in page.locator(".context").inner_text()
    assert page.problems == []
    assert key not in " ".join(context.sent)  # not one request carried the key

    other = _watched(context.new_page())  # the same session, another tab: no key there
    other.goto(created["url"])
    _first_image(other)
    assert "ouvrez le lien complet" in other.locator(".context").inner_text()
    wrong = _watched(context.new_page())
    wrong.goto(f"{created['url']}#k={'A' * 43}")
    _first_image(wrong)
    wrong.locator(".context .error").wait_for()
    assert "n'a pas pu être lu" in wrong.locator(".context").inner_text()
    assert "DUPONT" not in wrong.content() and "DUPONT" not in other.content()


def test_patients_are_grouped_and_never_mixed_and_shifted_dates_are_said(
        server: DicomwebServer, context: Any) -> None:
    studies = _studies(server)
    created = _share(server, studies, note="Deux patients : attention")
    page = _watched(context.new_page())
    page.goto(created["url"])
    _first_image(page)
    qido = httpx.get(f"{server.url}/studies", headers=ADMIN).json()
    pseudonyms = sorted({s["00100020"]["Value"][0] for s in qido})
    assert len(pseudonyms) == 2
    assert "2 patients" in page.locator(".sidebar .warning").inner_text()
    sections = page.locator(".sidebar section.patient")
    assert sections.count() == 2
    shown_parts: set[str] = set()
    assert sorted(sections.nth(n).locator(".pseudonym").inner_text() for n in range(2)) == pseudonyms
    for number in range(2):  # each patient's section holds that patient's studies only
        section = sections.nth(number)
        pseudonym = section.locator(".pseudonym").inner_text()
        owned = {s["0020000D"]["Value"][0] for s in qido if s["00100020"]["Value"][0] == pseudonym}
        tiles = section.locator(".series-tile")
        for tile in range(tiles.count()):
            series = tiles.nth(tile).get_attribute("data-series")
            found = httpx.get(f"{server.url}/series", params={"SeriesInstanceUID": series},
                              headers=ADMIN).json()
            assert found[0]["0020000D"]["Value"][0] in owned
        for tile in range(tiles.count()):  # body part and image count under each series
            series = tiles.nth(tile).get_attribute("data-series")
            [found] = httpx.get(f"{server.url}/series", params={"SeriesInstanceUID": series},
                                headers=ADMIN).json()
            part = found.get("00180015", {}).get("Value", [""])[0]
            count = found["00201209"]["Value"][0]
            told = tiles.nth(tile).locator(".count").inner_text()
            shown_parts.add(part)
            assert told.startswith(part) and told.endswith(f"{count} image" + ("s" if count > 1 else ""))
        headings = section.locator("h3").all_inner_texts()
        assert headings and all(h.strip() and h.strip() not in ("Examens", "Studies") for h in headings)
    assert "CHEST" in shown_parts
    assert "Dates décalées" in page.locator(".shifted-notice").inner_text()
    overlay = page.locator(".overlay.tl").first.inner_text()
    assert overlay.startswith("Patient P") and "dates décalées" in overlay
    page.set_viewport_size({"width": 390, "height": 844})  # a phone: the note stays readable
    note = page.locator(".sidebar .note")
    assert note.is_visible() and note.bounding_box()["width"] > 150
    assert page.problems == []


def _stored_ct(server: DicomwebServer, study: str) -> list[Dataset]:
    """The study's CT instances as stored, in instance order."""
    headers = {**ADMIN, "Accept": "application/dicom"}
    listed = httpx.get(f"{server.url}/studies/{study}/instances", headers=ADMIN).json()
    stored = [pydicom.dcmread(BytesIO(httpx.get(
        f"{server.url}/studies/{study}/series/{i['0020000E']['Value'][0]}/instances/"
        f"{i['00080018']['Value'][0]}", headers=headers).content)) for i in listed]
    return sorted((d for d in stored if d.Modality == "CT"), key=lambda d: int(d.InstanceNumber))


def _report_on(server: DicomwebServer, study: str) -> tuple[Dataset, str]:
    """A Basic Text SR written back into `study`, citing its third CT image."""
    ct = _stored_ct(server, study)
    report = basic_text_sr(ct, "Nodule de 6 mm du lobe supérieur droit, stable.")
    cited = ct[2]
    image = Dataset()
    image.RelationshipType, image.ValueType = "CONTAINS", "IMAGE"
    concept = Dataset()
    concept.CodeValue, concept.CodingSchemeDesignator, concept.CodeMeaning = "121112", "DCM", "Source of Measurement"
    image.ConceptNameCodeSequence = Sequence([concept])
    reference = Dataset()
    reference.ReferencedSOPClassUID = cited.SOPClassUID
    reference.ReferencedSOPInstanceUID = cited.SOPInstanceUID
    image.ReferencedSOPSequence = Sequence([reference])
    report.ContentSequence.append(image)
    answer = stow(f"{server.url}/studies/{study}", ADMIN, [report])
    assert answer.status_code in (200, 202), answer.text
    wait_for(lambda: any(s["00080060"]["Value"][0] == "SR" for s in httpx.get(
        f"{server.url}/studies/{study}/series", headers=ADMIN).json()), timeout=60,
        what="the report to be indexed")
    return report, str(cited.SOPInstanceUID)


def test_a_report_reads_as_a_report_and_opens_the_image_it_cites(
        server: DicomwebServer, context: Any) -> None:
    study = _studies(server)[0]
    _, cited = _report_on(server, study)
    page = _watched(context.new_page())
    page.goto(_share(server, [study])["url"])
    _first_image(page)
    tiles = page.locator(".series-tile")
    sr_tile = next(tiles.nth(n) for n in range(tiles.count())
                   if tiles.nth(n).locator("strong").inner_text().startswith("SR"))
    sr_tile.click()
    document = page.locator(".viewport .document").first
    document.wait_for()
    shown = document.inner_text()
    assert "Diagnostic imaging report" in shown and "Finding" in shown
    assert "Nodule de 6 mm du lobe supérieur droit, stable." in shown
    page.locator(".document button.cite").click()
    page.wait_for_function("() => document.querySelector('.viewport .document').hidden")
    page.wait_for_function(
        "(sop) => { const v = window.dgwViewer.app.viewports[0];"
        " return v.current && v.current.entry.sop === sop; }", arg=cited)
    assert page.locator(".series-tile.active strong").inner_text().startswith("CT")
    assert page.problems == []


def test_a_segmentation_is_drawn_over_the_images_it_segments(
        server: DicomwebServer, context: Any) -> None:
    study = _studies(server)[-1]
    ct = _stored_ct(server, study)
    answer = stow(f"{server.url}/studies/{study}", ADMIN, [segmentation(ct)])  # an AI's SEG
    assert answer.status_code in (200, 202), answer.text
    wait_for(lambda: any(s["00080060"]["Value"][0] == "SEG" for s in httpx.get(
        f"{server.url}/studies/{study}/series", headers=ADMIN).json()), timeout=60,
        what="the segmentation to be indexed")
    page = _watched(context.new_page())
    page.goto(_share(server, [study])["url"])
    page.wait_for_function("() => window.dgwViewer && window.dgwViewer.seriesLoaded >= 1",
                           timeout=15_000)
    assert page.locator(".series-tile.active strong").inner_text().startswith("CT")  # opened first
    page.wait_for_function("() => (window.dgwViewer.app.viewports[0].segmentLegend || []).length > 0",
                           timeout=15_000)
    assert "SEG: lesion" in page.locator(".overlay.br").first.inner_text()
    # The mask covers columns and rows 4 to 11 (tests/support/writeback.segmentation): read
    # inside and outside it from one and the same drawing.
    colours = """() => { const v = window.dgwViewer.app.viewports[0];
      const ratio = window.devicePixelRatio || 1, rect = v.canvas.getBoundingClientRect();
      const at = ([x, y]) => { const [px, py] = v.toPage(x, y);
        return Array.from(v.canvas.getContext('2d').getImageData(
          Math.round((px - rect.left) * ratio), Math.round((py - rect.top) * ratio), 1, 1).data).slice(0, 3); };
      const inside = at([8, 8]), outside = at([40, 40]);
      return new Set(inside).size > 1 ? [inside, outside] : null; }"""
    inside, outside = page.wait_for_function(colours, timeout=10_000).json_value()
    assert len(set(inside)) > 1 and len(set(outside)) == 1, (inside, outside)  # tinted / grey
    assert page.problems == []


PDF = (b"%PDF-1.4\n1 0 obj<</Type/Catalog/Pages 2 0 R>>endobj 2 0 obj<</Type/Pages/Kids[]/Count 0>>"
       b"endobj\ntrailer<</Root 1 0 R>>\n%%EOF\n")


def test_an_encapsulated_pdf_is_saved_as_the_pdf_it_holds(
        server: DicomwebServer, context: Any) -> None:
    # Put into the archive as it is: the site's pipeline refuses a document with burned-in
    # annotation (it cannot clean a PDF), so an archived one came by another, trusted, way.
    study = server.archive(encapsulated_pdf(_stored_ct(server, _studies(server)[0])[0], PDF,
                                            "Demande d'examen"))
    page = _watched(context.new_page())
    page.goto(_share(server, [study])["url"])  # its only series: it opens at once
    shown = page.locator(".viewport .document").first
    shown.locator("button.document-open").wait_for()
    assert "application/pdf" in shown.inner_text()
    with page.expect_download() as download:
        shown.locator("button.document-open").click()
    assert download.value.suggested_filename.endswith(".pdf")
    assert Path(download.value.path()).read_bytes()[:len(PDF)] == PDF
    assert page.problems == []


def _share_path(url: str) -> str:
    """The share link without its query and fragment."""
    return url.split("#")[0].split("?")[0]


def test_the_recipient_is_told_what_the_site_withheld_and_why(
        server: DicomwebServer, context: Any, tmp_path: Path) -> None:
    """A study one of whose images the site kept back (its pixels may show identity): the
    share's viewer says so under the study, with the count, modality and reason, and no
    value of the withheld image; the /withheld answer is scoped to the share."""
    source = write_sample_study(tmp_path / "partly", SampleStudySpec(
        ct_slices=3, mr_slices=0, ct_size=64, seed=91, identity=PlantedIdentity(
            patient_name="MARTIN^JEAN", patient_id="IPP-9000", ins="285057512345623",
            accession_number="ACC-PARTLY-1", study_date="20260402")))
    burned = pydicom.dcmread(source[0])
    burned.BurnedInAnnotation = "YES"
    burned.save_as(source[0])
    known = set(_studies(server))
    summary = run_import(source, server.pipeline, Spool(server.pipeline.spool_root, "site1"))
    assert sum(summary.quarantined.values()) == 1
    [study] = set(_studies(server)) - known
    created = _share(server, [study])
    page = _watched(context.new_page())
    page.goto(created["url"])
    _first_image(page)
    notice = page.locator(".sidebar .study .withheld")
    notice.wait_for()
    assert notice.count() == 1
    told = notice.inner_text()
    assert "1 image CT" in told and "texte incrusté" in told and "site producteur" in told
    assert str(burned.SOPInstanceUID) not in page.content()
    answer = context.request.get(_share_path(created["url"]) + "/withheld")
    assert answer.json() == {"studies": {study: [
        {"modality": "CT", "reason": "pixels_may_identify", "count": 1}]}}
    others = _share(server, sorted(known))  # another share sees none of it
    other = context.request.get(_share_path(others["url"]) + "/withheld")
    assert other.status == 200 and other.json() == {"studies": {}}
    assert page.problems == []


def test_a_presentation_state_opens_its_images_as_it_presents_them(
        server: DicomwebServer, context: Any) -> None:
    """A GSPS saved by a workstation (window, rotation, flip, a polyline and a text): its
    tile opens the series it references with that window, rotated and flipped, the
    polyline drawn over the first image, and says which presentation state is applied."""
    study, ct = next((s, ct) for s in _studies(server) if (ct := _stored_ct(server, s)))
    state = presentation_state(ct, center=40, width=100, rotation=90, flip=True)
    answer = stow(f"{server.url}/studies/{study}", ADMIN, [state])
    assert answer.status_code in (200, 202), answer.text
    wait_for(lambda: any(s["00080060"]["Value"][0] == "PR" for s in httpx.get(
        f"{server.url}/studies/{study}/series", headers=ADMIN).json()), timeout=60,
        what="the presentation state to be indexed")
    page = _watched(context.new_page())
    page.goto(_share(server, [study])["url"])
    _first_image(page)
    page.locator(".series-tile", has=page.locator("strong", has_text="PR")).click()
    page.wait_for_function("() => { const v = window.dgwViewer.app.viewports[0];"
                           " return v.presentation && v.window && v.current && v.current.entry.sop === "
                           f"'{ct[0].SOPInstanceUID}'; }}", timeout=15_000)
    shown = page.evaluate("() => { const v = window.dgwViewer.app.viewports[0];"
                          " return [v.window, v.rotation, v.flipH, v.stack.series]; }")
    assert shown == [[40, 100], 90, True, str(ct[0].SeriesInstanceUID)]
    assert "PR: KEY_VIEW" in page.locator(".overlay.br").first.inner_text()
    assert "W 100  L 40" in page.locator(".overlay.bl").first.inner_text()
    # The polyline runs from (4, 4) to (28, 4): drawn on it, the image alone beside it.
    colours = """() => { const v = window.dgwViewer.app.viewports[0];
      const ratio = window.devicePixelRatio || 1, rect = v.canvas.getBoundingClientRect();
      const at = ([x, y]) => { const [px, py] = v.toPage(x, y);
        return Array.from(v.canvas.getContext('2d').getImageData(
          Math.round((px - rect.left) * ratio), Math.round((py - rect.top) * ratio), 1, 1).data).slice(0, 3); };
      return [at([16, 4]), at([16, 16])]; }"""
    on_line, beside = page.evaluate(colours)
    assert on_line[2] > on_line[0] + 60 and len(set(beside)) == 1, (on_line, beside)
    assert page.problems == []
