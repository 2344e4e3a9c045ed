//! Procedural chest-radiograph phantoms with findings and report sentences (issue 7).
